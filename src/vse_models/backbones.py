"""Image and text backbones from local files only (the `backbones` extra: timm, transformers, pillow).

Nothing here downloads anything, ever: image backbones are `timm` models built by name with
`pretrained=False` and filled from a local weights file; text backbones are Hugging Face `transformers`
folders (`save_pretrained` output: config.json, weights, tokenizer files) read with
`local_files_only=True` (and HF_HUB_OFFLINE=1 set before transformers is imported).

- `ImageBackbone`: a timm ViT (CLS + patch tokens; AVSE's release samples its RBS views from the token
  embeddings and runs the blocks once per view) or any timm model whose features form a grid (Swin:
  (B, H, W, C) tokens, no CLS). `tokens(pixels)` = the whole forward with the final norm, (B, [1 +] N, C);
  `embed(pixels)` + `run_blocks(tokens)` = the release's ViT path (blocks without the final norm:
  lib/encoders.py `forward_vit` runs `ViTModel.encoder`, whose output the layernorm never sees).
- `TextBackbone`: `AutoModel` + `AutoTokenizer` from a folder; `tokenize(captions, augment)` gives
  [CLS] wordpieces [SEP] ids with the release's size augmentation in training (lib/image_caption.py
  `process_caption_bert`: each word with probability 0.2 is masked (50%), replaced by random tokens
  (10%) or deleted (40%)); `forward(ids, lengths)` = last hidden states, attention mask from the lengths.

A weights file that does not fit the model (a missing or unexpected key, a shape mismatch) is one error
naming the file and the first mismatching key. `from_checkpoint()` is a context in which backbones are
built from their configuration alone (random weights): checkpoint loading uses it, since the
checkpoint's own weights replace them at once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

EXTRA_HINT = 'pip install ".[backbones]"'
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # [code] lib/image_caption.py, for every backbone
IMAGENET_STD = (0.229, 0.224, 0.225)

_SKIP_PRETRAINED = [False]


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of the backbones extra is not installed."""


def require(module: str):
    """Imports `module` (timm, transformers, PIL) or raises one line naming the extra to install."""
    if module == "transformers":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub, whatever is passed
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        name = "pillow" if module.startswith("PIL") else module
        raise MissingExtraError(f"{name} is not installed; raw images and backbones need the extra: {EXTRA_HINT}") from None
    if module == "transformers":
        mod.logging.set_verbosity_error()  # its load report lists the unused pooler; misfits are checked here
        mod.logging.disable_progress_bar()
    return mod


@contextlib.contextmanager
def from_checkpoint():
    """Backbones built inside this context skip their pretrained weights (a checkpoint replaces them)."""
    _SKIP_PRETRAINED.append(True)
    try:
        yield
    finally:
        _SKIP_PRETRAINED.pop()


def skipping_pretrained() -> bool:
    return _SKIP_PRETRAINED[-1]


# ------------------------------------------------------------------------------------------- weights
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: .safetensors, or a torch file (.pth/.pt/.bin, read with
    weights_only=True; a {"state_dict": ...} or {"model": ...} wrapper is unwrapped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"image backbone weights file not found: {path} (pass --option image_weights=FILE, "
                                f"a timm state dict saved as .safetensors or .pth, or image_weights=random)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def load_state_dict_strict(module: nn.Module, state: dict, path, what: str, ignore_prefixes=()) -> None:
    """Loads `state` into `module` or raises one line naming `path` and the first key that does not fit."""
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes) or k in own}
    for key, value in state.items():
        if key not in own:
            raise ValueError(f"{path} does not fit {what}: unexpected key {key!r} "
                             f"({len(set(state) - set(own))} unexpected, {len(set(own) - set(state))} missing)")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{path} does not fit {what}: key {key!r} has shape {tuple(value.shape)} in the file, "
                             f"{tuple(own[key].shape)} in the model")
    missing = [k for k in own if k not in state]
    if missing:
        raise ValueError(f"{path} does not fit {what}: missing key {missing[0]!r} ({len(missing)} missing)")
    module.load_state_dict(state, strict=True)


# -------------------------------------------------------------------------------------------- image
class ImageBackbone(nn.Module):
    """A timm image model built by name (`pretrained=False`, no classifier) and filled from `weights`
    (a local file, or "random" for random initialisation). `args` are passed to timm.create_model
    (e.g. {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2} for a small ViT)."""

    def __init__(self, name: str, weights: str | None, image_size: int, args: dict | None = None,
                 grad_checkpointing: bool = False):
        super().__init__()
        timm = require("timm")
        if not isinstance(name, str) or not name:
            raise ValueError(f"image_backbone must be a timm model name, got {name!r}")
        if weights is None:
            raise ValueError(f"image_backbone {name!r} needs weights: pass --option image_weights=FILE (a local timm "
                             f"state dict, .safetensors or .pth) or image_weights=random (random initialisation)")
        args = dict(args or {})
        try:
            if timm.models.model_entrypoint(name).__module__.endswith(".vision_transformer"):
                args.setdefault("dynamic_img_size", True)  # any input size: position embeddings interpolated
        except (RuntimeError, ValueError, KeyError):
            pass  # an unknown name: create_model says so below
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, **args)
        except RuntimeError as e:  # timm: unknown model name
            raise ValueError(f"image_backbone {name!r}: {e} (see timm.list_models())") from None
        except TypeError as e:
            raise ValueError(f"image_backbone {name!r}: bad image_backbone_args {args}: {e}") from None
        from timm.models.vision_transformer import VisionTransformer

        self.is_vit = isinstance(model, VisionTransformer) and bool(getattr(model, "has_class_token", False))
        if weights != "random" and not skipping_pretrained():
            state = read_state_dict(weights)
            filt = getattr(__import__(type(model).__module__, fromlist=["_"]), "checkpoint_filter_fn", None)
            if filt is not None:  # timm's own conversions (original checkpoints' keys, pos_embed resampling)
                try:
                    state = filt(state, model)
                except Exception:  # a filter that does not apply: the strict check below names the misfit
                    pass
            head = model.pretrained_cfg.get("classifier") or "head"
            load_state_dict_strict(model, state, Path(weights).expanduser(), f"timm model {name!r}",
                                   ignore_prefixes=tuple(f"{h}." for h in ([head] if isinstance(head, str) else head)))
        if not self.is_vit and hasattr(model, "set_input_size"):
            default = model.pretrained_cfg.get("input_size", (3, image_size, image_size))[-1]
            if image_size != getattr(model.patch_embed, "img_size", (default,))[0]:
                model.set_input_size(img_size=(image_size, image_size))
        self.model, self.name, self.image_size = model, name, image_size
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.num_features = int(model.num_features)
        self.has_cls = self.is_vit
        with torch.no_grad():  # the grid side at this input size, from one tiny forward pass
            was = model.training
            model.eval()
            probe = self.tokens(torch.zeros(1, 3, image_size, image_size))
            model.train(was)
        n = probe.size(1) - int(self.has_cls)
        s = int(round(n ** 0.5))
        if s * s != n:
            raise ValueError(f"image_backbone {name!r} gives {n} tokens at {image_size} px, not a square grid")
        self.grid_size = s

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT: (B, 3, H, W) -> (B, 1 + N, C) token embeddings (patch + position + CLS), before the blocks."""
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT: the transformer blocks on any token subset (B, n, C), without the final norm [code]."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for blk in self.model.blocks:
                tokens = checkpoint(blk, tokens, use_reentrant=False)
            return tokens
        return self.model.blocks(tokens)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """The whole forward (final norm included): (B, [1 +] N, C), CLS first when there is one, patches
        row-major (the layout of `{split}_grids.npy` + `{split}_grid_cls.npy`)."""
        x = self.model.forward_features(pixels)
        if x.dim() == 4:  # (B, H, W, C) grid (Swin and other hierarchical models)
            x = x.flatten(1, 2)
        elif x.dim() == 3 and getattr(self.model, "num_prefix_tokens", 0) > int(self.has_cls):
            x = torch.cat([x[:, :1], x[:, self.model.num_prefix_tokens:]], 1)  # drop register tokens
        return x


# --------------------------------------------------------------------------------------------- text
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model")


class TextBackbone(nn.Module):
    """A Hugging Face text encoder (BERT and the like) with its tokenizer, from a local folder."""

    def __init__(self, folder: str, random_init: bool = False, grad_checkpointing: bool = False):
        super().__init__()
        transformers = require("transformers")
        path = Path(str(folder)).expanduser()
        hint = ("pass --option text_backbone=FOLDER, a local folder written by save_pretrained (config.json, "
                "model.safetensors, tokenizer files); nothing is downloaded")
        if not path.is_dir():
            raise FileNotFoundError(f"text backbone folder not found: {path} ({hint})")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json ({hint})")
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise FileNotFoundError(f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}) ({hint})")
        load = not random_init and not skipping_pretrained()
        if load and not any((path / f).is_file() for f in _WEIGHT_FILES):
            raise FileNotFoundError(f"{path}: no weights ({' or '.join(_WEIGHT_FILES[:2])}); {hint}, "
                                    f"or --option text_random_init=true for random weights")
        kw = dict(local_files_only=True)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kw)
            config = transformers.AutoConfig.from_pretrained(str(path), **kw)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read the tokenizer or config ({str(e).splitlines()[0]})") from None
        extra = {"add_pooling_layer": False} if config.model_type in ("bert", "roberta") else {}  # unused pooler
        if load:
            try:
                model, info = transformers.AutoModel.from_pretrained(str(path), output_loading_info=True, **extra, **kw)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"{path}: cannot load the text backbone ({str(e).splitlines()[0]})") from None
            bad = [("missing", k) for k in info.get("missing_keys", [])] + \
                  [("mismatched", k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
            if bad:
                raise ValueError(f"{path}: the weights do not fit its config.json: {bad[0][0]} key {bad[0][1]!r} "
                                 f"({len(bad)} keys do not fit)")
        else:
            model = transformers.AutoModel.from_config(config, **extra)
        if grad_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model, self.folder = model, str(path)
        self.hidden_size = int(config.hidden_size)
        limits = [getattr(config, "max_position_embeddings", None), getattr(self.tokenizer, "model_max_length", None)]
        self.max_length = min([v for v in limits if isinstance(v, int) and 0 < v < 1_000_000] or [512])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.mask_id = self.tokenizer.mask_token_id
        self.vocab_size = int(config.vocab_size)
        tk = self.tokenizer
        first = tk.cls_token_id if tk.cls_token_id is not None else tk.bos_token_id
        last = tk.sep_token_id if tk.sep_token_id is not None else tk.eos_token_id
        self.prefix, self.suffix = [t for t in [first] if t is not None], [t for t in [last] if t is not None]

    def _word_pieces(self, captions: list[str]) -> list[list[list[int]]]:
        """Per caption: a list of words, each the list of its wordpiece ids (no special tokens)."""
        enc = self.tokenizer(list(captions), add_special_tokens=False)
        out = []
        for i, ids in enumerate(enc["input_ids"]):
            word_ids = enc.word_ids(i) if getattr(enc, "is_fast", False) else list(range(len(ids)))
            words: list[list[int]] = []
            last = object()
            for tok, w in zip(ids, word_ids):
                if w != last or w is None:
                    words.append([])
                    last = w
                words[-1].append(tok)
            out.append(words)
        return out

    def tokenize(self, captions: list[str], augment: bool = False, rate: float = 0.2):
        """(ids (B, L) long padded with the pad id, lengths (B,)) on CPU. `augment`: the release's size
        augmentation (per word with probability `rate`: 50% [MASK], 10% random ids, 40% deleted),
        drawn from torch's RNG (so a seeded run repeats it)."""
        seqs = []
        for words in self._word_pieces(captions):
            kept: list[int] = []
            if augment:
                draws = torch.rand(len(words)).tolist()
            for w, pieces in enumerate(words):
                p = draws[w] if augment else 1.0
                if p < rate:
                    p /= rate
                    if p < 0.5 and self.mask_id is not None:
                        kept += [self.mask_id] * len(pieces)
                    elif p < 0.6:
                        kept += torch.randint(self.vocab_size, (len(pieces),)).tolist()
                    # else: deleted
                else:
                    kept += pieces
            ids = self.prefix + kept + self.suffix  # [CLS] ... [SEP] [code]
            if len(ids) > self.max_length:  # keep [CLS] ... and the closing [SEP]
                ids = ids[: self.max_length - 1] + ids[-1:]
            seqs.append(ids)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        out = torch.full((len(seqs), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out, lengths

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.size(1), device=ids.device)[None, :] < lengths.to(ids.device)[:, None]).long()
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state


__all__ = ["EXTRA_HINT", "IMAGENET_MEAN", "IMAGENET_STD", "ImageBackbone", "MissingExtraError", "TextBackbone",
           "from_checkpoint", "load_state_dict_strict", "read_state_dict", "require"]


# ------------------------------------------------------------------------------ models with backbones
BACKBONE_OPTIONS = {
    "image_backbone": None,       # timm model name; needs raw-image data (features "images")
    "image_weights": None,        # a local weights file (timm state dict), or "random"
    "image_backbone_args": {},    # timm.create_model keyword arguments (e.g. a small ViT's sizes)
    "text_backbone": None,        # a local transformers folder (BERT: model + tokenizer) instead of the BiGRU
    "text_random_init": False,    # the text backbone's config with random weights
    "text_size_augment": True,    # [code] the release's caption size augmentation in training
    "backbone_lr_factor": 0.1,    # [code] backbone lr = lr x 0.1 (lib/vse.py create_optimizer)
    "freeze_backbone": False,     # backbones get no gradient (and stay in eval mode)
    "grad_checkpointing": False,  # recompute the backbones' blocks in the backward pass (less memory)
    "backbone_dropout": 0.2,      # [code] dropout on the text backbone's token states
}
BACKBONE_OPTION_TYPES = {"image_backbone": str, "image_weights": str, "text_backbone": str}


class BackboneMixin:
    """For a RetrievalModel: builds the backbones its options name, gives them `backbone_lr_factor` x lr,
    freezes them on request, and encodes captions with the text backbone. Call `build_backbones` in
    `__init__` after `RetrievalModel.__init__`."""

    image_backbone: ImageBackbone | None
    text_backbone: TextBackbone | None

    def build_backbones(self, info) -> None:
        o = self.options
        self.image_backbone = self.text_backbone = None
        if o["features"] == "images":
            if not o["image_backbone"]:
                raise ValueError(f"raw-image data needs an image backbone: --option image_backbone=NAME (a timm model, "
                                 f"e.g. vit_base_patch16_224) and --option image_weights=FILE (or =random)")
            if not info.image_size:
                raise ValueError("raw-image data without an image size (DataInfo.image_size)")
            self.image_backbone = ImageBackbone(o["image_backbone"], o["image_weights"], info.image_size,
                                                o["image_backbone_args"], o["grad_checkpointing"])
        elif o["image_backbone"]:
            raise ValueError(f"image_backbone {o['image_backbone']!r} needs raw-image data (--data with images, features "
                             f"'images'); to use a backbone with precomputed grids, extract them with vse-extract")
        if o["text_backbone"]:
            self.text_backbone = TextBackbone(o["text_backbone"], o["text_random_init"], o["grad_checkpointing"])
        self.backbone_dropout = nn.Dropout(o["backbone_dropout"])
        for module in self.backbone_modules():
            module.requires_grad_(not o["freeze_backbone"])

    def backbone_modules(self) -> list[nn.Module]:
        return [m for m in (self.image_backbone, self.text_backbone) if m is not None]

    def param_groups(self, lr: float) -> list[dict]:
        inside = {id(p) for m in self.backbone_modules() for p in m.parameters()}
        groups = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in inside], "lr": lr}]
        trained = [p for m in self.backbone_modules() for p in m.parameters() if p.requires_grad]
        if trained:
            groups.append({"params": trained, "lr": lr * self.options["backbone_lr_factor"]})
        return groups

    def train(self, mode: bool = True):
        super().train(mode)
        if self.options["freeze_backbone"]:
            for module in self.backbone_modules():
                module.eval()  # frozen: no dropout, fixed statistics
        return self

    def text_states(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (B, L, H) after the release's dropout, lengths (B,)) of the batch's raw captions."""
        device = next(self.text_backbone.parameters()).device
        captions = batch.extra.get("captions")
        if captions is None:
            raise ValueError("a text backbone needs the raw captions (Batch.extra['captions'])")
        ids, lengths = self.text_backbone.tokenize(captions, augment=self.training and self.options["text_size_augment"])
        lengths = lengths.to(device)
        return self.backbone_dropout(self.text_backbone(ids.to(device), lengths)), lengths
