from .naive import meta_sim_reference
from .op import meta_sim, meta_sim_chunked

__all__ = ["meta_sim", "meta_sim_chunked", "meta_sim_reference", "Variant", "use_variant"]


def __getattr__(name: str):
    # The kernel variants live with the Triton kernels, imported on first use: `import vse_kernels` loads no
    # triton.
    if name in ("Variant", "use_variant"):
        from . import triton_kernels
        return getattr(triton_kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
