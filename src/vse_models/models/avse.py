"""AVSE (SPEC §3.2; Liu et al., AAAI 2025, code liuyyy111/AVSE): asymmetric visual-semantic embedding.

An image gets V view embeddings (concatenated: (B, V·D)); a caption gets one (B, D). Both are cut into
meta-semantic units of `meta_dim` and scored by AEOM, S(I, T) = sum_j max_i cos(unit_i(I), unit_j(T)),
which is `vse_kernels.meta_sim(img, txt, block_dim=meta_dim)`. Training loss L = L_m + reg_weight·L_reg.

Views:
- regions (default): `GroupEncoder` — V = 6 learnable group tokens; each group keeps its top 80%
  regions; shared projection (fc + residual MLP) -> one GPO -> L2 per view [paper supplement].
- grids (`features="grids"`, or any data with a grid size): `RBSEncoder` — radial bias sampling,
  V = 2 views, each keeping int(r·(1 + s·s)) patches, r = 0.8 (train) / 0.9 (eval), plus the CLS token
  when present (set_size = s*s + 1, CLS first); shared fc -> GPO -> L2 per view, no residual MLP
  (`grid_mlp=True` adds VSE∞'s) [code].
Text: word embedding -> BiGRU (halves averaged) -> fc(x) + MLP(x) on the valid words -> GPO -> L2.

[ours] choices (the sources are silent or wrong):
- group assignment: cosine between the projected regions and the tokens; hard top-k
  (floor(0.8·n), at least 1) with a straight-through gate so the tokens receive a gradient;
- RBS at evaluation: fixed centres, a hash of (image id, view, `rbs_seed`) — the release re-draws
  them, which makes evaluation random; the stochastic variant (`rbs_mode="stochastic"`, training only)
  samples ∝ exp(-alpha·dist) as the release's demo (dist in patch units; alpha = 4/s gives the
  earlier, softer form in units of the grid side); a grid without CLS keeps the same int(r·(1 + N))
  patches;
- L_reg with V > 2 views: mean over consecutive view pairs (v, v+1); `reg_form="code"` is the
  released code's C / B variant (default: the paper's);
- Sinkhorn (`sinkhorn=True`, off by default): SuperGlue-style log-domain Sinkhorn with a learnable
  dustbin (init 0) on each (V·q)×q unit block, A <- A·plan before max/sum. It needs the unit tensor,
  so it runs the einsum path (`aeom_reference`) on both backends;
- padding (dropped regions, padded words) never reaches the projections' BatchNorm;
- `embed_size`, `meta_dim` and `num_views` default to the paper's (1024, 512 regions / 256 grids,
  6 regions / 2 grids); `meta_dim` left unset follows D (D/2 regions, D/4 grids: the paper's q = 2
  and the code's q = 4 text units at any D); the synthetic preset `configs/avse-synthetic.toml`
  shrinks D to 256 for CPU speed.

`backend="reference"`: AEOM by einsum and L_m by `losses.hinge_triplet_loss_reference` — pure
PyTorch, vse_kernels is never imported (the kernels path imports it lazily).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones import BACKBONE_OPTION_TYPES, BACKBONE_OPTIONS, BackboneMixin
from ..avse_parts import GroupEncoder, RBSEncoder, aeom_reference, view_regularizer
from ..layers import GPO, BiGRUTextEncoder, RegionEncoder, drop_set_elements, l2norm, project_set, set_lengths
from ..losses import hinge_triplet_loss
from . import DataInfo, RetrievalModel, register_model


@register_model("avse")
class AVSE(BackboneMixin, RetrievalModel):
    default_options = {
        "embed_size": 1024,          # D [paper]
        "meta_dim": None,            # unit size; None: D/2 regions, D/4 grids (512 [paper] / 256 [code] at D=1024)
        "num_views": None,           # None: 6 group tokens (regions) [paper], 2 RBS views (grids) [code]
        "group_keep": 0.8,           # each group keeps its top 80% regions [paper]
        "rbs_keep_train": 0.8,       # [code]
        "rbs_keep_eval": 0.9,        # [code]
        "rbs_mode": "nearest",       # or "stochastic" (∝ exp(-alpha·dist), training only)
        "rbs_alpha": 4.0,            # [code, demo]
        "rbs_seed": 0,               # seed of the fixed evaluation centres [ours]
        "word_dim": 300,
        "residual_mlp": True,        # regions: fc + VSE∞'s residual MLP before grouping
        "grid_mlp": False,           # grids: fc only, as the release; True adds the residual MLP [ours]
        "gpo_dim": 32,
        "margin": 0.2,
        "warmup_epochs": 1,          # all negatives in the first epoch, hardest afterwards [code]
        "region_drop": 0.2,          # VSE∞'s training-time region dropout, before grouping
        "text_dropout": 0.0,
        "sinkhorn": False,           # optional Sinkhorn on the unit blocks (off in the release)
        "sinkhorn_iters": 20,        # [paper]
        "reg_weight": 1.0,           # L = L_m + reg_weight · L_reg
        "reg_lambda": 0.005,         # [paper] (0.0051 in the code)
        "reg_form": "paper",         # or "code" (C / B)
        "backend": "kernels",        # or "reference" (pure PyTorch)
        "features": "regions",       # or "grids" (radial bias sampling), or "images" (a backbone, see below)
        "rbs_on": "embeddings",      # image backbone: RBS on the ViT's token embeddings, blocks per view [code];
                                     # "tokens": on the backbone's output grid (Swin, or a cheaper ViT path)
        "grid_drop": False,          # [code] the release's size augmentation of each view's tokens
        **BACKBONE_OPTIONS,
    }
    option_choices = {"rbs_mode": ("nearest", "stochastic"), "reg_form": ("paper", "code"),
                      "rbs_on": ("embeddings", "tokens")}
    option_types = {"meta_dim": int, "num_views": int, **BACKBONE_OPTION_TYPES}
    # Region setting [paper]: AdamW, lr 5e-4, 5e-5 for the last 10 of 25 epochs, batch 128, clip 2.
    recipe = {"optimizer": "adamw", "lr": 5e-4, "batch_size": 128, "epochs": 25, "lr_milestones": [15],
              "lr_gamma": 0.1, "grad_clip": 2.0, "weight_decay": 0.0}
    feature_kind = "regions"

    def __init__(self, options, info):
        super().__init__(options, info)
        o = self.options
        if o["backend"] not in ("kernels", "reference"):
            raise ValueError(f"backend must be 'kernels' or 'reference', got {o['backend']!r}")
        if o["features"] not in ("regions", "grids", "images"):
            raise ValueError(f"features must be 'regions', 'grids' or 'images', got {o['features']!r}")
        self.build_backbones(info)
        bb = self.image_backbone
        if bb is not None:  # raw images: the backbone's patch grid (+ CLS) feeds the RBS views
            info = DataInfo(**{**info.to_dict(), "feature_dim": bb.num_features, "grid_size": bb.grid_size,
                               "set_size": bb.grid_size ** 2 + int(bb.has_cls)})
            if o["rbs_on"] == "embeddings":
                if not bb.is_vit:
                    raise ValueError(f"rbs_on='embeddings' samples a ViT's token embeddings; {o['image_backbone']!r} "
                                     f"is not a ViT with a CLS token: use --option rbs_on=tokens")
                self.has_unused_parameters = True  # the ViT's final norm is not used on this path [code]
        # Grid data (info.grid_size set, e.g. `vse-train --features grids`) always gets RBS views.
        grids = o["features"] in ("grids", "images") or info.grid_size is not None
        d = o["embed_size"]
        self.meta_dim = o["meta_dim"] or (d // 4 if grids else d // 2)  # q = 4 / 2 text units
        self.num_views = o["num_views"] or (2 if grids else 6)
        if d % self.meta_dim:
            raise ValueError(f"embed_size {d} must be a multiple of meta_dim {self.meta_dim}")
        self.grids = grids
        if grids:
            s = info.grid_size
            if not s or info.set_size not in (s * s, s * s + 1):
                raise ValueError(f"features='grids' needs grid data (grid_size s with s*s or s*s + 1 tokens), "
                                 f"got grid_size={s}, set_size={info.set_size}")
            self.img_enc = RBSEncoder(info.feature_dim, d, s, has_cls=info.set_size == s * s + 1,
                                      num_views=self.num_views, keep_train=o["rbs_keep_train"],
                                      keep_eval=o["rbs_keep_eval"], mode=o["rbs_mode"], alpha=o["rbs_alpha"],
                                      seed=o["rbs_seed"], residual_mlp=o["grid_mlp"], gpo_dim=o["gpo_dim"],
                                      grid_drop=o["grid_drop"])
        else:
            self.img_enc = GroupEncoder(info.feature_dim, d, self.num_views, o["group_keep"], o["residual_mlp"],
                                        o["gpo_dim"])
        if self.text_backbone is None:
            self.txt_enc = BiGRUTextEncoder(info.vocab_size, o["word_dim"], d, dropout=o["text_dropout"])
            self.txt_proj = RegionEncoder(d, d, residual_mlp=True)  # fc(x) + MLP(x) [paper]
        else:  # [code] EncoderText_BERT: fc(x) + MLP(x) on BERT's token states -> GPO -> LayerNorm
            self.txt_proj = RegionEncoder(self.text_backbone.hidden_size, d, residual_mlp=True)
            self.txt_ln = nn.LayerNorm(d)
        self.txt_pool = GPO(o["gpo_dim"], o["gpo_dim"])
        self.dustbin = nn.Parameter(torch.zeros(())) if o["sinkhorn"] else None

    # ------------------------------------------------------------------------------------ encoders
    def image_views(self, batch) -> torch.Tensor:
        """(B, V, D) L2-normalised view embeddings."""
        feats = batch.images
        if self.image_backbone is not None:
            return self.backbone_views(batch)
        if self.grids:
            return self.img_enc(feats, batch.img_ids)
        lengths = set_lengths(feats, batch.image_lengths)
        if self.training:
            feats, lengths = drop_set_elements(feats, lengths, self.options["region_drop"])
        return self.img_enc(feats, lengths)

    def backbone_views(self, batch) -> torch.Tensor:
        """Raw images -> (B, V, D). rbs_on "embeddings" [code] (lib/encoders.py `forward_vit`): the views are
        sampled from the ViT's token embeddings and each view runs through the blocks; "tokens": the whole
        image runs once and the views are sampled from its output grid."""
        bb = self.image_backbone
        if self.options["rbs_on"] == "tokens":
            return self.img_enc(bb.tokens(batch.images), batch.img_ids)
        views = self.img_enc.select(bb.embed(batch.images), batch.img_ids)  # (B, V, n, C)
        b, v, n, c = views.shape
        return self.img_enc.pool_selected(bb.run_blocks(views.reshape(b * v, n, c)).view(b, v, n, c))

    def encode_images(self, batch) -> torch.Tensor:
        views = self.image_views(batch)
        return views.reshape(views.size(0), -1)  # (B, V·D): V·D/meta_dim units per image

    def encode_texts(self, batch) -> torch.Tensor:
        if self.text_backbone is not None:
            states, lengths = self.text_states(batch)
            pooled, _ = self.txt_pool(project_set(self.txt_proj, states, lengths), lengths)
            return l2norm(self.txt_ln(pooled))
        words = project_set(self.txt_proj, self.txt_enc(batch.tokens, batch.lengths), batch.lengths)
        pooled, _ = self.txt_pool(words, batch.lengths)
        return l2norm(pooled)

    # ---------------------------------------------------------------------------------- similarity
    def similarity(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        if self.dustbin is not None:
            return aeom_reference(img_emb, txt_emb, self.meta_dim, self.dustbin, self.options["sinkhorn_iters"])
        if self.options["backend"] == "kernels":
            import vse_kernels  # lazily: the reference backend never imports it

            return vse_kernels.meta_sim(img_emb, txt_emb, block_dim=self.meta_dim)
        return aeom_reference(img_emb, txt_emb, self.meta_dim)

    def search_units(self, emb: torch.Tensor, side: str) -> torch.Tensor:
        """The meta-semantic units AEOM compares, L2-normalised as meta_sim normalises them (not with Sinkhorn)."""
        if self.dustbin is not None:
            raise NotImplementedError("search_units: with sinkhorn=true the score is not a late interaction of units")
        return nn.functional.normalize(emb.reshape(emb.size(0), -1, self.meta_dim), dim=-1, eps=1e-12)

    # ---------------------------------------------------------------------------------------- loss
    def embedding_loss(self, img_emb: torch.Tensor, txt_emb: torch.Tensor, img_ids, epoch: int):
        """L_m + reg_weight * L_reg from the (B, V·D) image and (B, D) text embeddings (the registry's
        contract: `loss(batch, epoch)` encodes and calls this; under torchrun on the gathered batch)."""
        o = self.options
        scores = self.similarity(img_emb, txt_emb).float()
        l_m = hinge_triplet_loss(scores, margin=o["margin"], max_violation=epoch >= o["warmup_epochs"],
                                 img_ids=img_ids, backend=o["backend"])
        if o["reg_weight"]:
            l_reg = view_regularizer(img_emb.view(img_emb.size(0), self.num_views, -1), o["reg_lambda"], o["reg_form"])
        else:
            l_reg = scores.new_zeros(())
        loss = l_m + o["reg_weight"] * l_reg
        return loss, {"loss": loss.item(), "l_m": l_m.item(), "l_reg": l_reg.item()}
