"""`mh-cvse`: Multi-Head Consensus-aware Visual-Semantic Embedding (SPEC §3.3; arXiv 2412.19184 on top of
CVSE, ECCV 2020).

Instance level: regions -> Linear -> LayerNorm(x + MHSA(x)) (8 heads) -> L2 -> attention pooling -> v_I;
words -> BiGRU (dropout 0.4) -> LayerNorm(x + MHSA(x, key-padding mask)) -> L2 -> masked attention
pooling -> t_I. The pooling is CVSE's (model_CVSE.py V_ / T_single_modal_atten, cvse_parts.AttentionPool):
regions with BatchNorm1d(set_size) over the region slots (CVSE's BatchNorm1d(36); a data set with another
set size gets BatchNorm1d of its own size, fixed in the checkpoint) and guided by their mean, words
without BatchNorm and guided by l2norm(masked mean); Dropout(pool_dropout, by default text_dropout's 0.4,
CVSE's single dropout_rate) after each tanh in training. Consensus level: a GCN over the concept
co-occurrence graph gives concept embeddings Z (q x D); each side predicts a distribution over concepts
(text: mixed with its labels) and x_C = l2norm(s @ Z). Fusion (weight_sum | adap_sum | concat) gives x_F. Loss:
w_F·rank(F) + w_I·rank(I) + w_C·rank(C) + w_KL·KL(s_t || s_v), base weights (3, 5, 1, 2), fixed or
dynamic; every term summed over the batch (the KL also over the concepts, as CVSE's code). Score:
0.95·<v_F, t_F> + 0.05·<v_C, t_C>. Cosine-annealed learning rate.

Data state (from `prepare(train_split)`, training captions only, deterministic, cached beside the data by
`cvse_parts.concept_data`): the q concept word ids
(`word_to_concept`, vocab-sized) and the normalised adjacency Â (q x q), both persistent buffers, so a
checkpoint evaluates without training data; the training images' labels (union of their captions'
concepts, CVSE's y for text in training) are a non-persistent buffer, rebuilt by `prepare` on resume.
[ours] At evaluation a caption's labels are the concepts its own words mention (no image labels are
known for a test caption); `complete_text_labels` offers CVSE's test-time label completion as an option
(`label_completion_k` > 0: every evaluation applies it, through `complete_text_set`).

Ablation options of ours, CVSE's / MH-CVSE's behaviour by default: `region_drop` and `region_mlp` (VSE∞'s
region dropout and residual MLP), `pooling="gpo"` (the baseline's pooling instead of attention pooling),
`train_text_labels="caption"` (a training caption keeps its own labels, as at evaluation),
`self_attention="image"|"text"|false` (on one side only, or none) and `attention_residual`
("post_norm", "pre_norm", "rezero": cvse_parts.SelfAttentionBlock). Their measured effect on the synthetic
data is in the README.

`cvse` (class CVSE below) is this model with MH-CVSE's additions off by default (no self-attention,
fixed loss weights, step schedule; fusion weight_sum, as here): CVSE, the yardstick of MH-CVSE's claim.

`backend="reference"` uses torch.nn.MultiheadAttention and the pure-PyTorch hinge loss and imports
nothing from vse_kernels.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..cvse_parts import (GCN, ConsensusLevel, InstancePool, Fusion, SelfAttentionBlock, caption_labels,
                          concept_data, loss_weights, read_glove, text_concept_distribution)
from ..layers import (BiGRUTextEncoder, RegionEncoder, drop_set_elements, l2norm, padding_mask, project_set,
                      set_lengths)
from ..losses import hinge_triplet_loss, hinge_triplet_loss_embeddings
from . import RetrievalModel, register_model

LOSS_NAMES = ("rank_fused", "rank_instance", "rank_consensus", "kl")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in fp32 under autocast; float64 stays (the backend equality test runs in float64)."""
    return x if x.dtype == torch.float64 else x.float()


@register_model("mh-cvse")
class MHCVSE(RetrievalModel):
    default_options = {
        "embed_size": 1024,          # D (CVSE)
        "word_dim": 300,
        "num_concepts": 300,         # q (CVSE)
        "gcn_hidden": 512,
        "num_heads": 8,              # MH-CVSE figure 2
        "self_attention": True,      # both sides; [ours] "image" or "text": one side only; False: CVSE's instance level
        "attention_residual": "post_norm",  # [ours] post_norm | pre_norm | rezero (cvse_parts.SelfAttentionBlock)
        "pooling": "attention",      # CVSE's attention pooling, or [ours] "gpo" (VSE∞'s, as the baseline)
        "pool_dropout": None,        # dropout in the attention pooling; None: text_dropout's (CVSE's one dropout_rate)
        "text_dropout": 0.4,
        "region_drop": 0.0,          # [ours] VSE∞'s training-time region dropout (CVSE: none)
        "region_mlp": False,         # [ours] VSE∞'s residual MLP beside the region Linear (CVSE: Linear only)
        "beta": 0.35,                # F30K (0.4 COCO)
        "train_text_labels": "image",  # y of a training caption: its image's labels (CVSE) or [ours] "caption"
        "fusion": "weight_sum",      # weight_sum | adap_sum | concat
        "fusion_alpha": 0.85,        # weight_sum; where adap_sum and concat start (cvse_parts.Fusion)
        "loss_weights": [3.0, 5.0, 1.0, 2.0],  # fused, instance, consensus rank; KL (CVSE)
        "dynamic_loss_weights": True,  # False: CVSE's fixed weights (ablation)
        "kl_reduction": "sum",       # CVSE's code sums KL over batch and concepts; [ours] "batchmean"
        "score_fused_weight": 0.95,    # evaluation: w·<v_F,t_F> + (1 − w)·<v_C,t_C>
        "margin": 0.2,
        "warmup_epochs": 0,          # epochs with all negatives before the hardest (CVSE: none)
        "lr_schedule": "cosine",     # cosine (T_max = epochs) | step (config lr_milestones, CVSE)
        "eta_min": 0.0,
        "glove_path": None,          # local GloVe text file for word and concept vectors
        "label_completion_k": 0,     # test-time label completion: k nearest captions (0 = off)
        "backend": "kernels",        # or "reference" (pure PyTorch)
        "tiled_loss": False,         # rank losses straight from the embeddings, no B x B matrices
        "features": "regions",
    }
    # Checked by resolve_options before a model is built (a bool default would refuse "image" / "text").
    option_choices = {"self_attention": (True, False, "image", "text"),
                      "attention_residual": SelfAttentionBlock.RESIDUALS, "pooling": InstancePool.KINDS,
                      "fusion": Fusion.MODES, "kl_reduction": ("sum", "batchmean"), "lr_schedule": ("cosine", "step"),
                      "train_text_labels": ("image", "caption")}
    option_types = {"pool_dropout": numbers.Real, "glove_path": str}
    # CVSE on F30K: Adam 2e-4, batch 128, 50 epochs (x0.1 at 25 there; cosine annealing here), clip 2.
    recipe = {"optimizer": "adam", "lr": 2e-4, "batch_size": 128, "epochs": 50, "lr_milestones": [25],
              "lr_gamma": 0.1, "grad_clip": 2.0, "weight_decay": 0.0}

    def __init__(self, options, info):
        super().__init__(options, info)
        o = self.options
        d, q = o["embed_size"], o["num_concepts"]
        if len(o["loss_weights"]) != 4:
            raise ValueError(f"loss_weights must have 4 entries (fused, instance, consensus, kl), got {o['loss_weights']}")
        for name, allowed in (("kl_reduction", ("sum", "batchmean")), ("lr_schedule", ("cosine", "step")),
                              ("train_text_labels", ("image", "caption")),
                              ("self_attention", (True, False, "image", "text")),
                              ("attention_residual", SelfAttentionBlock.RESIDUALS)):
            if o[name] not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {o[name]!r}")
        backend = o["backend"]
        self.img_fc = RegionEncoder(info.feature_dim, d, residual_mlp=o["region_mlp"])
        self.txt_enc = BiGRUTextEncoder(info.vocab_size, o["word_dim"], d, dropout=o["text_dropout"])
        self.img_attn, self.txt_attn = (
            SelfAttentionBlock(d, o["num_heads"], backend, o["attention_residual"])
            if o["self_attention"] in (True, side) else None for side in ("image", "text"))
        pool_dropout = o["text_dropout"] if o["pool_dropout"] is None else o["pool_dropout"]
        self.img_pool, self.txt_pool = (InstancePool(o["pooling"], d, side, info.set_size, pool_dropout)
                                        for side in ("image", "text"))
        self.concept_emb = nn.Parameter(torch.empty(q, o["word_dim"]).uniform_(-0.1, 0.1))
        self.gcn = GCN(o["word_dim"], o["gcn_hidden"], d)
        self.img_consensus, self.txt_consensus = ConsensusLevel(d, d), ConsensusLevel(d, d)
        self.img_fusion = Fusion(o["fusion"], d, o["fusion_alpha"])
        self.txt_fusion = Fusion(o["fusion"], d, o["fusion_alpha"])
        self.register_buffer("word_to_concept", torch.full((info.vocab_size,), -1, dtype=torch.long))
        self.register_buffer("adjacency", torch.eye(q))
        self.register_buffer("train_image_labels", torch.zeros(0, q, dtype=torch.bool), persistent=False)
        self.register_buffer("base_loss_weights", torch.tensor(o["loss_weights"], dtype=torch.float32),
                             persistent=False)

    # ------------------------------------------------------------------------------- data state
    def prepare(self, train_split) -> None:
        """Concepts, labels and graph from the training captions (deterministic); GloVe if given."""
        q, k = self.options["num_concepts"], train_split.captions_per_image
        vocab, tokens = train_split.vocab, train_split.tokens
        if tokens is None:
            raise RuntimeError("prepare() needs a training split with a vocabulary (set_vocab)")
        if len(vocab) != self.info.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} words, the model was built for {self.info.vocab_size}")
        data = concept_data(tokens, vocab.idx2word, q, k, train_split.n_images,
                            cache_dir=getattr(train_split, "root", None))  # a Split on disk: cached beside it
        concepts = data["concepts"].tolist()
        self.word_to_concept.copy_(data["word_to_concept"])
        self.adjacency.copy_(data["adjacency"])
        self.train_image_labels = data["image_labels"].to(self.adjacency.device)
        self.concept_words = [vocab.idx2word[i] for i in concepts]
        if self.options["glove_path"]:
            self._load_glove(vocab.idx2word, concepts)

    def _load_glove(self, idx2word, concepts) -> None:
        dim = self.options["word_dim"]
        vectors, found = read_glove(self.options["glove_path"], idx2word, dim)
        if not found.any():
            raise ValueError(f"{self.options['glove_path']}: none of the vocabulary's words was found")
        with torch.no_grad():
            emb = self.txt_enc.embed.weight
            emb[found] = vectors[found].to(emb)          # words missing from GloVe keep their random init
            cidx = torch.as_tensor(concepts, dtype=torch.long)
            if len(concepts):
                self.concept_emb[: len(concepts)] = emb[cidx.to(emb.device)]

    # ---------------------------------------------------------------------------------- encoders
    def concept_embeddings(self) -> torch.Tensor:
        return self.gcn(self.concept_emb, self.adjacency)

    def _image_instance(self, batch) -> torch.Tensor:
        feats, lengths = batch.images, set_lengths(batch.images, batch.image_lengths)
        if self.training:
            feats, lengths = drop_set_elements(feats, lengths, self.options["region_drop"])
        x = project_set(self.img_fc, feats, lengths)  # padding never reaches region_mlp's BatchNorm
        pad = padding_mask(lengths, x.size(1)) if bool((lengths < x.size(1)).any()) else None
        if self.img_attn is not None:
            x = self.img_attn(x, pad)
        return self.img_pool(x, lengths, pad)

    def _text_instance(self, batch) -> torch.Tensor:
        lengths = batch.lengths
        if bool((lengths < 1).any()):  # a fully masked attention row: NaN in the reference, 0 in the kernel
            raise ValueError("every caption needs at least one token")
        x = self.txt_enc(batch.tokens, lengths)
        pad = padding_mask(lengths, x.size(1))
        if self.txt_attn is not None:
            x = self.txt_attn(x, pad)
        return self.txt_pool(x, lengths, pad)

    def encode_images(self, batch):
        """(v_I, v_C, v_F, s_v)."""
        z = self.concept_embeddings()
        v_inst = self._image_instance(batch)
        s_v = self.img_consensus(v_inst, z)
        v_cons = l2norm(s_v @ z)
        return v_inst, v_cons, self.img_fusion(v_inst, v_cons), s_v

    def text_labels(self, batch) -> torch.Tensor:
        """y: in training, the labels of the caption's image (CVSE; `train_text_labels="caption"`: its own, as
        at evaluation); otherwise the caption's own concepts."""
        if (self.training and self.options["train_text_labels"] == "image" and self.train_image_labels.numel()
                and batch.img_ids is not None):
            return self.train_image_labels[batch.img_ids].float()
        return caption_labels(batch.tokens, self.word_to_concept, self.options["num_concepts"])

    def _text_from_instance(self, t_inst, p_t, labels, z):
        s_t = text_concept_distribution(p_t, labels, self.options["beta"])
        t_cons = l2norm(s_t @ z)
        return t_inst, t_cons, self.txt_fusion(t_inst, t_cons), s_t, p_t, labels

    def encode_texts(self, batch):
        """(t_I, t_C, t_F, s_t, p_t, y): p_t and y are kept for test-time label completion."""
        z = self.concept_embeddings()
        t_inst = self._text_instance(batch)
        p_t = self.txt_consensus(t_inst, z)
        return self._text_from_instance(t_inst, p_t, self.text_labels(batch), z)

    @torch.no_grad()
    def complete_text_labels(self, txt_emb, k: int | None = None, block: int = 1024):
        """CVSE's test-time label completion ([ours] form): each caption's labels are OR-ed with those of its
        k nearest captions of the same set (cosine of t_I), then t_C and t_F are recomputed. Transductive
        (uses the other test captions): an option, never the default."""
        k = self.options["label_completion_k"] if k is None else k
        if k <= 0 or txt_emb[0].size(0) < 2:  # a single caption has no neighbour
            return txt_emb
        t_inst, _, _, _, p_t, labels = txt_emb
        completed = labels.clone()
        for s in range(0, t_inst.size(0), block):
            sims = t_inst[s:s + block] @ t_inst.t()
            rows = torch.arange(sims.size(0), device=sims.device)
            sims[rows, rows + s] = float("-inf")  # not itself
            nearest = sims.topk(min(k, t_inst.size(0) - 1), dim=1).indices
            completed[s:s + block] = torch.maximum(completed[s:s + block], labels[nearest].amax(1))
        return self._text_from_instance(t_inst, p_t, completed, self.concept_embeddings())

    def complete_text_set(self, txt_emb):
        """Evaluation (`evaluate_split`, so vse-train's dev/test and vse-eval) applies the label completion of
        the option `label_completion_k` (0, the default: none) to each evaluated set."""
        return self.complete_text_labels(txt_emb)

    def similarity(self, img_emb, txt_emb) -> torch.Tensor:
        w = self.options["score_fused_weight"]
        return w * (img_emb[2] @ txt_emb[2].t()) + (1 - w) * (img_emb[1] @ txt_emb[1].t())

    def search_units(self, emb, side: str) -> torch.Tensor:
        """One unit per item whose dot product is the score: [w·v_F, (1 - w)·v_C] for images, [t_F, t_C] for texts."""
        w = self.options["score_fused_weight"]
        fused, cons = emb[2], emb[1]
        if side == "image":
            fused, cons = w * fused, (1 - w) * cons
        return torch.cat([fused, cons], 1)[:, None, :]

    # -------------------------------------------------------------------------------------- loss
    def embedding_loss(self, img_emb, txt_emb, img_ids, epoch: int):
        v_inst, v_cons, v_fused, s_v = img_emb
        t_inst, t_cons, t_fused, s_t, _, _ = txt_emb
        o = self.options
        max_violation = epoch >= o["warmup_epochs"]

        def rank(v, t):  # each level is a cosine similarity of single embeddings
            options = dict(margin=o["margin"], max_violation=max_violation, img_ids=img_ids, backend=o["backend"])
            if o["tiled_loss"]:
                return hinge_triplet_loss_embeddings(_at_least_fp32(v), _at_least_fp32(t), **options)
            return hinge_triplet_loss(_at_least_fp32(v @ t.t()), **options)

        # KL(s_t || s_v): F.kl_div(input=log s_v, target=s_t)
        kl = F.kl_div(torch.log(_at_least_fp32(s_v).clamp_min(1e-12)), _at_least_fp32(s_t),
                      reduction=o["kl_reduction"])
        terms = torch.stack([rank(v_fused, t_fused), rank(v_inst, t_inst), rank(v_cons, t_cons), kl])
        weights = loss_weights(terms, self.base_loss_weights.to(terms.dtype), o["dynamic_loss_weights"])
        total = (weights * terms).sum()
        logs = {"loss": total.item()}
        logs.update({n: float(v) for n, v in zip(LOSS_NAMES, terms.detach().tolist())})
        logs.update({f"w_{n}": float(v) for n, v in zip(LOSS_NAMES, weights.tolist())})
        return total, logs

    def make_scheduler(self, optimizer, config: dict, steps_per_epoch: int):
        if self.options["lr_schedule"] == "step":
            return super().make_scheduler(optimizer, config, steps_per_epoch)
        # Stepped once per epoch: T_max = epochs reaches eta_min after the last one.
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config["epochs"]),
                                                          eta_min=self.options["eta_min"])


@register_model("cvse")
class CVSE(MHCVSE):
    """`cvse`: MH-CVSE with its additions off, i.e. CVSE (ECCV 2020) as its code trains it: no
    self-attention, CVSE's fixed loss weights (3, 5, 1, 2), step learning-rate schedule, `weight_sum` fusion.
    The yardstick of MH-CVSE's claim; each addition can be switched back on with its option."""

    default_options = {**MHCVSE.default_options, "self_attention": False, "dynamic_loss_weights": False,
                       "lr_schedule": "step", "fusion": "weight_sum"}
