"""Baseline `vse`: VSE∞-style (SPEC §3.4). Regions -> fc + residual MLP -> GPO -> L2; words -> BiGRU ->
GPO -> L2; cosine similarity; VSE++ hinge loss (all negatives in the first `warmup_epochs`, then the
hardest), with same-image pairs masked. `backend="reference"` uses no vse_kernels op."""

from __future__ import annotations

import torch
from torch import nn

from ..layers import GPO, BiGRUTextEncoder, RegionEncoder, drop_set_elements, l2norm, set_lengths
from ..backbones import BACKBONE_OPTION_TYPES, BACKBONE_OPTIONS, BackboneMixin
from . import RetrievalModel, register_model


@register_model("vse")
class VSE(BackboneMixin, RetrievalModel):
    default_options = {
        "embed_size": 1024,      # VSE∞
        "word_dim": 300,
        "residual_mlp": True,
        "gpo_dim": 32,
        "margin": 0.2,
        "warmup_epochs": 1,      # VSE∞: all negatives in the first epoch
        "region_drop": 0.2,      # VSE∞ drops 20% of the regions of each training image
        "text_dropout": 0.0,
        "backend": "kernels",    # or "reference" (pure PyTorch)
        "tiled_loss": False,     # hinge loss straight from the embeddings, no B x B matrix (large batches)
        "features": "regions",   # or "grids": the patch grid is used as a set of s*s vectors; "images": a backbone's
                                 # output tokens (+ CLS) as the set (VSE∞'s backbone setting)
        **BACKBONE_OPTIONS,
    }
    option_types = dict(BACKBONE_OPTION_TYPES)
    # VSE∞ (BUTD + BiGRU): AdamW 5e-4, batch 128, 25 epochs, x0.1 at epoch 15, grad clip 2.
    recipe = {"optimizer": "adamw", "lr": 5e-4, "batch_size": 128, "epochs": 25, "lr_milestones": [15],
              "lr_gamma": 0.1, "grad_clip": 2.0, "weight_decay": 0.0}

    def __init__(self, options, info):
        super().__init__(options, info)
        o = self.options
        self.build_backbones(info)
        feature_dim = self.image_backbone.num_features if self.image_backbone is not None else info.feature_dim
        self.img_enc = RegionEncoder(feature_dim, o["embed_size"], o["residual_mlp"])
        self.img_pool = GPO(o["gpo_dim"], o["gpo_dim"])
        if self.text_backbone is None:
            self.txt_enc = BiGRUTextEncoder(info.vocab_size, o["word_dim"], o["embed_size"], dropout=o["text_dropout"])
        else:  # VSE∞'s BERT text encoder: a linear layer on the token states -> GPO
            self.txt_fc = nn.Linear(self.text_backbone.hidden_size, o["embed_size"])
        self.txt_pool = GPO(o["gpo_dim"], o["gpo_dim"])

    def encode_images(self, batch) -> torch.Tensor:
        feats = self.image_backbone.tokens(batch.images) if self.image_backbone is not None else batch.images
        lengths = set_lengths(feats, batch.image_lengths if self.image_backbone is None else None)
        if self.training:
            feats, lengths = drop_set_elements(feats, lengths, self.options["region_drop"])
        pooled, _ = self.img_pool(self.img_enc(feats), lengths)
        return l2norm(pooled)

    def encode_texts(self, batch) -> torch.Tensor:
        if self.text_backbone is not None:
            states, lengths = self.text_states(batch)
            pooled, _ = self.txt_pool(self.txt_fc(states), lengths)
            return l2norm(pooled)
        pooled, _ = self.txt_pool(self.txt_enc(batch.tokens, batch.lengths), batch.lengths)
        return l2norm(pooled)

    def similarity(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        return img_emb @ txt_emb.t()

    def search_units(self, emb: torch.Tensor, side: str) -> torch.Tensor:
        return emb[:, None, :]  # one unit: the cosine is their dot product
