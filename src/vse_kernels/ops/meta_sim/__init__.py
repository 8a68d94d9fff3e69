from .naive import meta_sim_reference
from .op import meta_sim, meta_sim_chunked

__all__ = ["meta_sim", "meta_sim_chunked", "meta_sim_reference"]
