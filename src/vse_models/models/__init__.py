"""Model registry. A model is an `nn.Module` subclass of `RetrievalModel` registered by name:

    @register_model("avse")
    class AVSE(RetrievalModel):
        default_options = {...}      # hyperparameters; the run config's [model_options] override them
        recipe = {...}               # trainer defaults for this model (lr, epochs, optimizer, ...)
        feature_kind = "regions"     # or "grids"; an option "features" overrides it per run

Put the class in a module of this package (models/<name>.py): every module here is imported on first
lookup. The trainer and `vse-eval` use only this contract, so a new model never touches them:

- `__init__(options, info)`: `options` = default_options updated with the run's; `info` = DataInfo
  (vocab_size, feature_dim, set_size, grid_size, captions_per_image). Everything shape-defining must
  follow from these two, because a checkpoint is rebuilt from them before its weights are loaded.
- `prepare(train_split)`: optional, called once before training (fresh and resumed runs alike) with the
  training `data.Split` (captions, tokens, vocab, memory-mapped features) to derive data state such as
  concept labels or a co-occurrence graph. Keep that state in (persistent) buffers of a shape fixed by
  options/info: it is then saved with the weights and evaluation needs no training data.
- `encode_images(batch)` / `encode_texts(batch)`: embeddings of a `data.Batch`; a tensor or a tuple of
  tensors, each with the batch on dim 0 (several embeddings per side are fine).
- `similarity(img_emb, txt_emb)`: (Ni, Nt) scores of two embedding blocks. Evaluation calls it on
  blocks sliced along dim 0 (`slice_embeddings`) on the model's device: it must not assume full sets.
- `embedding_loss(img_emb, txt_emb, img_ids, epoch)`: (scalar loss, {name: float}) from the encoders'
  outputs for a batch of caption/image pairs (`img_ids` marks same-image rows). Under torchrun the trainer
  all-gathers the embeddings (with gradients) and img_ids first, so the loss ranks the global batch.
  The default: hinge loss of similarity, all negatives in epochs < `warmup_epochs`, hardest negatives
  afterwards; with the option `tiled_loss` (cosine models) `vse_kernels.hinge_triplet_loss_embeddings`,
  which never holds the B x B matrix. `loss(batch, epoch)` encodes and calls it: override
  `embedding_loss`, not `loss`, so that distributed training sees the whole loss.
- `search_units(emb, side)`: optional, for FAISS candidate generation (`vse_models.ann`): (N, U, d) units of
  image (side="image") or text embeddings such that `similarity(img, txt)[a, b]` equals
  `sum_j max_i <img_units[a, i], txt_units[b, j]>` (`meta_sim_reference(..., normalize=False)`; U = 1 for
  one-vector scores).
- `has_unused_parameters`: set True when some parameters can get no gradient in a step (tells DDP).
- `param_groups(lr)` and `make_scheduler(optimizer, config, steps_per_epoch)`: optional; the defaults are
  one group and MultiStepLR(config lr_milestones, lr_gamma). The scheduler is stepped once per epoch
  (config = the run config: epochs, lr, ... for e.g. cosine annealing over `config["epochs"]`).
- A packaged preset `src/vse_models/configs/<name>-synthetic.toml` (run-config keys, `[model_options]`)
  is applied on the synthetic data set; `recipe` holds the paper's recipe for real data.
- `options["backend"]`: "kernels" (vse_kernels ops) or "reference" (pure PyTorch), by convention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..losses import hinge_triplet_loss, hinge_triplet_loss_embeddings

_REGISTRY: dict[str, type["RetrievalModel"]] = {}
COMMON_OPTION_CHOICES = {"backend": ("kernels", "reference"), "features": ("regions", "grids", "images")}
_IMPORT_ERRORS: dict[str, str] = {}


@dataclass
class DataInfo:
    """What a model may know about its data (saved in the checkpoint config)."""

    vocab_size: int
    feature_dim: int
    set_size: int
    grid_size: int | None = None
    captions_per_image: int = 5
    image_size: int | None = None   # raw images (features "images"): the S x S network input

    def to_dict(self) -> dict:
        return asdict(self)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not here


def is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def register_model(name: str):
    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type["RetrievalModel"]:
    _load_builtin()
    if name not in _REGISTRY:
        broken = "".join(f"; models/{m}.py failed to import ({err})" for m, err in _IMPORT_ERRORS.items())
        raise ValueError(f"unknown model {name!r}; available: {sorted(_REGISTRY)}{broken}")
    return _REGISTRY[name]


def build_model(name: str, options: dict | None, info: DataInfo) -> "RetrievalModel":
    cls = get_model_class(name)
    return cls(cls.resolve_options(options), info)


def _load_builtin() -> None:
    # Every module of this package is imported once, so a model file dropped in here (models/avse.py,
    # models/mhcvse.py, ...) registers itself without any other file changing.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in _IMPORT_ERRORS:
            try:
                importlib.import_module(f"{__name__}.{info.name}")
            except Exception as e:  # a broken model module must not hide the others; reported on lookup
                _IMPORT_ERRORS[info.name] = f"{type(e).__name__}: {e}"


def slice_embeddings(emb, start: int, stop: int):
    """emb[start:stop] for a tensor or a tuple/list of tensors (batch on dim 0)."""
    if isinstance(emb, torch.Tensor):
        return emb[start:stop]
    return type(emb)(e[start:stop] for e in emb)


def take_embeddings(emb, idx: torch.Tensor):
    """emb[idx] for a tensor or tuple of tensors (rows gathered: from a memory map only those are read)."""
    return emb[idx] if isinstance(emb, torch.Tensor) else type(emb)(e[idx] for e in emb)


def float_embeddings(emb):
    """emb in float32, a tensor or a tuple of tensors."""
    return emb.float() if isinstance(emb, torch.Tensor) else type(emb)(e.float() for e in emb)


def cat_embeddings(chunks: list):
    """Concatenates per-batch embeddings (tensors or tuples of tensors) along dim 0."""
    if isinstance(chunks[0], torch.Tensor):
        return torch.cat(chunks)
    return type(chunks[0])(torch.cat(parts) for parts in zip(*chunks))


class RetrievalModel(nn.Module):
    """Base class: see the module docstring for the contract."""

    name = "base"
    default_options: dict = {}
    option_choices: dict = {}   # option -> allowed values (checked before a model is built)
    option_types: dict = {}     # option with a None default -> the type of its other values
    recipe: dict = {}
    feature_kind = "regions"
    has_unused_parameters = False  # True: some parameters may get no gradient in a step (DDP must look)

    def __init__(self, options: dict, info: DataInfo):
        super().__init__()
        self.options = dict(options)
        self.info = info

    @classmethod
    def resolve_options(cls, options: dict | None) -> dict:
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.default_options))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for model {cls.name!r}; "
                             f"known: {sorted(cls.default_options)}")
        for key, value in options.items():
            cls._check_option(key, value)
        return {**cls.default_options, **options}

    @classmethod
    def _check_option(cls, key: str, value) -> None:
        """An option's value must be one of its `option_choices`, else of its default's type: a mistyped
        value ("False" for False, "adap_summ") is refused before any work instead of silently changing it."""
        choices = {**COMMON_OPTION_CHOICES, **cls.option_choices}.get(key)
        default = cls.default_options[key]
        if choices is not None:
            ok, what = any(value == c and type(value) is type(c) for c in choices), f"one of {list(choices)}"
        elif default is None:  # "unset" by default: None or a value of the declared type
            kind = cls.option_types.get(key)
            if kind is None:
                return
            ok = value is None or (isinstance(value, kind) and not isinstance(value, bool))
            what = f"a {kind.__name__} (or null: unset)"
        elif isinstance(default, bool):
            ok, what = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, what = is_int(value), "an integer"
        elif isinstance(default, float):
            ok, what = is_finite_number(value), "a finite number"
        else:
            ok, what = isinstance(value, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise ValueError(f"option {key} of model {cls.name!r} must be {what}, got {value!r}")

    @classmethod
    def features_for(cls, options: dict | None) -> str:
        return (options or {}).get("features", cls.default_options.get("features", cls.feature_kind))

    def prepare(self, train_split) -> None:
        pass

    def encode_images(self, batch):
        raise NotImplementedError

    def encode_texts(self, batch):
        raise NotImplementedError

    def similarity(self, img_emb, txt_emb) -> torch.Tensor:
        raise NotImplementedError

    def search_units(self, emb, side: str) -> torch.Tensor:
        raise NotImplementedError(f"model {self.name!r} defines no search_units: FAISS candidate search is not "
                                  f"available for it (brute-force search is)")

    def complete_text_set(self, txt_emb):
        """The text embeddings of a whole evaluation set (or 5-fold fold) as they are scored: unchanged here;
        a model with a transductive test-time step (mh-cvse's label completion) overrides it."""
        return txt_emb

    def loss(self, batch, epoch: int) -> tuple[torch.Tensor, dict]:
        return self.embedding_loss(self.encode_images(batch), self.encode_texts(batch), batch.img_ids, epoch)

    def embedding_loss(self, img_emb, txt_emb, img_ids, epoch: int) -> tuple[torch.Tensor, dict]:
        options = dict(margin=self.options.get("margin", 0.2), max_violation=epoch >= self.options.get("warmup_epochs", 0),
                       img_ids=img_ids, backend=self.options.get("backend", "kernels"))
        if self.options.get("tiled_loss"):  # cosine similarity of single embeddings: img_emb @ txt_emb.T
            loss = hinge_triplet_loss_embeddings(img_emb.float(), txt_emb.float(), **options)
        else:
            loss = hinge_triplet_loss(self.similarity(img_emb, txt_emb).float(), **options)
        return loss, {"loss": loss.item()}

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def make_scheduler(self, optimizer, config: dict, steps_per_epoch: int):
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.get("lr_milestones", [])),
                                                    gamma=config.get("lr_gamma", 0.1))


__all__ = ["DataInfo", "RetrievalModel", "available_models", "build_model", "cat_embeddings",
           "get_model_class", "is_finite_number", "is_int", "register_model", "slice_embeddings"]
