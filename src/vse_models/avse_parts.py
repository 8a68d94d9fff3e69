"""Building blocks of AVSE (SPEC §3.2), pure PyTorch (nothing here imports vse_kernels):

- `GroupEncoder`: V learnable group tokens, hard top-k regions per group, shared projection, one GPO,
  one L2-normalised view per group.
- Radial Bias Sampling (`rbs_num_kept`, `rbs_fixed_centres`, `rbs_random_centres`, `rbs_indices`) and
  `RBSEncoder`: V views of a patch grid.
- `aeom_reference`: AEOM similarity by einsum (what `vse_kernels.meta_sim` fuses), with the optional
  log-domain Sinkhorn refinement (`log_sinkhorn`).
- `view_regularizer`: L_reg between views (paper and released-code forms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GPO, RegionEncoder, drop_set_elements, l2norm, padding_mask, project_set


def _floor_ratio(ratio: float, n: torch.Tensor) -> torch.Tensor:
    # floor(ratio * n) robust to 0.8 * 5 = 3.9999999 in floating point.
    return torch.floor(n.double() * ratio + 1e-6).long()


def pool_views(pool: GPO, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """feats (B, V, k, D), lengths (B,) or (B, V) -> (B, V, D) GPO-pooled, L2-normalised views.
    One GPO shared by all views: the B*V sets are pooled in one call."""
    b, v, k, d = feats.shape
    lengths = lengths if lengths.dim() == 2 else lengths[:, None].expand(b, v)
    pooled, _ = pool(feats.reshape(b * v, k, d), lengths.reshape(b * v))
    return l2norm(pooled).view(b, v, d)


# ------------------------------------------------------------------------------------- region groups
class GroupEncoder(nn.Module):
    """Views from region features [paper supplement]: regions -> shared projection (fc + residual MLP,
    VSE∞) -> cosine with each of V learnable group tokens -> each group keeps its top
    floor(keep_ratio * n_regions) regions (at least 1) -> one shared GPO -> L2 norm.

    [ours] cosine between projected regions and tokens; hard top-k. A hard top-k gives the tokens no
    gradient, so the kept features x become x + x·(a - stop_grad(a)) (a = the cosine): the forward
    value is exactly x while the tokens learn as if x were scaled by (1 + a)."""

    def __init__(self, in_dim: int, embed_dim: int, num_views: int = 6, keep_ratio: float = 0.8,
                 residual_mlp: bool = True, gpo_dim: int = 32):
        super().__init__()
        if not 0 < keep_ratio <= 1:
            raise ValueError(f"group keep_ratio must be in (0, 1], got {keep_ratio}")
        self.num_views, self.keep_ratio = num_views, keep_ratio
        self.proj = RegionEncoder(in_dim, embed_dim, residual_mlp)
        self.tokens = nn.Parameter(torch.randn(num_views, embed_dim))
        self.pool = GPO(gpo_dim, gpo_dim)

    def assign(self, x: torch.Tensor, lengths: torch.Tensor):
        """x (B, K, D) projected regions -> (cosine (B, V, K), kept indices (B, V, k_max), kept lengths (B,)).
        Indices are sorted by decreasing cosine; entries past the kept length point at padding."""
        sims = torch.einsum("bkd,vd->bvk", l2norm(x), l2norm(self.tokens.to(x.dtype)))
        kept = _floor_ratio(self.keep_ratio, lengths).clamp(min=1)
        k_max = int(kept.max())
        masked = sims.masked_fill(padding_mask(lengths, x.size(1))[:, None, :], float("-inf"))
        idx = masked.detach().topk(k_max, dim=2).indices
        return sims, idx, kept

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """feats (B, K, F), lengths (B,) -> views (B, V, D)."""
        x = project_set(self.proj, feats, lengths)
        sims, idx, kept = self.assign(x, lengths)
        b, v, k = idx.shape
        d = x.size(-1)
        sel = x[:, None].expand(b, v, x.size(1), d).gather(2, idx[..., None].expand(b, v, k, d))
        gate = sims.gather(2, idx)[..., None]
        sel = sel + sel * (gate - gate.detach())  # straight-through: exactly sel, but tokens get gradient
        sel = sel.masked_fill(padding_mask(kept, k)[:, None, :, None], 0)
        return pool_views(self.pool, sel, kept)


# ------------------------------------------------------------------------------ radial bias sampling
def rbs_num_kept(n_patches: int, keep_ratio: float) -> int:
    """Patches kept per view, as the release computes it (liuyyy111/AVSE lib/encoders.py,
    VisionTransEncoder.forward_vit): `new_n = int(r * (1 + N))` with 1 + N the token count *including*
    the CLS slot, Python's truncating int() of the float product, and then the CLS token on top
    (N = 196: 157 patches in training, 177 at evaluation). [ours] a grid without CLS keeps the same
    int(r * (1 + N)) patches (the release has no such path: it always takes token 0 as CLS), and the
    count is clamped to [1, N] (the release's topk fails above N and keeps only CLS at 0)."""
    return max(1, min(n_patches, int(keep_ratio * (1 + n_patches))))


def grid_coordinates(grid_size: int, device=None) -> torch.Tensor:
    """(s*s, 2) float (row, col) of patch p = r * s + c (the row-major flattening of the loaders)."""
    r = torch.arange(grid_size, device=device).repeat_interleave(grid_size)
    c = torch.arange(grid_size, device=device).repeat(grid_size)
    return torch.stack([r, c], 1).float()


_HASH_P = 2_147_483_647  # 2^31 - 1 (a Lehmer generator's modulus; products stay inside int64)


def rbs_fixed_centres(img_ids: torch.Tensor, num_views: int, n_patches: int, seed: int = 0) -> torch.Tensor:
    """[ours] evaluation centres: a fixed hash of (image id, view, seed), so an image always gets the
    same views, whatever its batch or position in it. (B,) -> (B, V) long in [0, N)."""
    ids = img_ids.long()[:, None] % _HASH_P
    view = torch.arange(num_views, device=img_ids.device)[None, :]
    h = (ids * 1_000_003 + view * 7_919 + (seed % 100_000) * 104_729 + 12_345) % _HASH_P
    for _ in range(3):
        h = (h * 48_271) % _HASH_P
    return h % n_patches


def rbs_random_centres(batch: int, num_views: int, n_patches: int, device=None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Training centres [code]: uniform per image and view (torch RNG, so seeded runs repeat)."""
    return torch.randint(n_patches, (batch, num_views), device=device, generator=generator)


def rbs_indices(centres: torch.Tensor, grid_size: int, keep_ratio: float, has_cls: bool = False,
                mode: str = "nearest", alpha: float = 4.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token indices of each view: centres (B, V) -> (B, V, n) long, n = rbs_num_kept(N, r) + has_cls.

    Tokens are [CLS] + patches when has_cls (CLS = index 0, always kept, first), else the patches.
    mode "nearest" [code] (lib/encoders.py radial_bias_sampling_groups: topk of exp(-4·dist)): the n
    patches nearest the centre, Euclidean on (row, col) patch coordinates; [ours] ties at the cut go to
    the lower patch index (the release leaves them to topk). mode "stochastic" [code, demo] (ddd.py:
    multinomial without replacement): n patches drawn with probability ∝ exp(-alpha · dist), dist in
    patch units as there (Gumbel top-k, the same distribution)."""
    n_patches = grid_size * grid_size
    n = rbs_num_kept(n_patches, keep_ratio)
    coords = grid_coordinates(grid_size, centres.device)
    dist = torch.cdist(coords[centres.reshape(-1)], coords).view(*centres.shape, n_patches)  # (B, V, N)
    if mode == "nearest":
        idx = dist.sort(dim=-1, stable=True).indices[..., :n]
    elif mode == "stochastic":
        u = torch.rand(dist.shape, device=dist.device, generator=generator).clamp_(1e-20, 1.0)
        keys = -alpha * dist - torch.log(-torch.log(u))
        idx = keys.topk(n, dim=-1).indices
    else:
        raise ValueError(f"rbs mode must be 'nearest' or 'stochastic', got {mode!r}")
    if has_cls:
        cls = torch.zeros(*idx.shape[:-1], 1, dtype=idx.dtype, device=idx.device)
        idx = torch.cat([cls, idx + 1], dim=-1)
    return idx


class RBSEncoder(nn.Module):
    """Views from a patch grid [code]: tokens -> shared projection -> per view the tokens chosen by radial
    bias sampling -> one shared GPO -> L2 norm. The projection is the release's fc alone
    (lib/encoders.py EncoderImageAggr: fc -> GPO -> l2norm); `residual_mlp=True` adds VSE∞'s residual
    MLP beside it (AVSE's `grid_mlp` option). Training: random centres, keep_train; evaluation: [ours]
    fixed seeded centres (rbs_fixed_centres), keep_eval, nearest."""

    def __init__(self, in_dim: int, embed_dim: int, grid_size: int, has_cls: bool = False, num_views: int = 2,
                 keep_train: float = 0.8, keep_eval: float = 0.9, mode: str = "nearest", alpha: float = 4.0,
                 seed: int = 0, residual_mlp: bool = False, gpo_dim: int = 32, grid_drop: bool = False):
        super().__init__()
        self.grid_drop = grid_drop
        if mode not in ("nearest", "stochastic"):
            raise ValueError(f"rbs_mode must be 'nearest' or 'stochastic', got {mode!r}")
        self.grid_size, self.has_cls, self.num_views = grid_size, has_cls, num_views
        self.keep_train, self.keep_eval, self.mode, self.alpha, self.seed = keep_train, keep_eval, mode, alpha, seed
        self.proj = RegionEncoder(in_dim, embed_dim, residual_mlp)
        self.pool = GPO(gpo_dim, gpo_dim)

    def view_indices(self, batch: int, img_ids: torch.Tensor | None, device) -> torch.Tensor:
        n_patches = self.grid_size ** 2
        if self.training:
            centres = rbs_random_centres(batch, self.num_views, n_patches, device)
            return rbs_indices(centres, self.grid_size, self.keep_train, self.has_cls, self.mode, self.alpha)
        if img_ids is None:
            img_ids = torch.arange(batch, device=device)
        centres = rbs_fixed_centres(img_ids.to(device), self.num_views, n_patches, self.seed)
        return rbs_indices(centres, self.grid_size, self.keep_eval, self.has_cls, "nearest")

    def select(self, tokens: torch.Tensor, img_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, [1 +] s*s, C) -> the tokens of each view (B, V, n, C)."""
        b = tokens.size(0)
        expected = self.grid_size ** 2 + int(self.has_cls)
        if tokens.size(1) != expected:
            raise ValueError(f"grid features must have {expected} tokens per image, got {tokens.size(1)}")
        idx = self.view_indices(b, img_ids, tokens.device)  # (B, V, n)
        v, n, d = idx.size(1), idx.size(2), tokens.size(-1)
        return tokens[:, None].expand(b, v, tokens.size(1), d).gather(2, idx[..., None].expand(b, v, n, d))

    def pool_selected(self, views: torch.Tensor, project: bool = True) -> torch.Tensor:
        """(B, V, n, C) view tokens -> (projection) -> (the release's size augmentation) -> GPO -> L2: (B, V, D).
        `grid_drop` [code] (lib/encoders.py `forward_img_encoder`, training only): per view, 80% of the images
        drop each token with probability 0.2·u, u ~ U[0, 1) per image and view (the CLS token too)."""
        x = self.proj(views) if project else views
        b, v, n, d = x.shape
        lengths = torch.full((b * v,), n, dtype=torch.long, device=x.device)
        if self.training and self.grid_drop:
            u = torch.rand(b * v, device=x.device)
            flat, lengths = drop_set_elements(x.reshape(b * v, n, d), lengths, torch.where(u > 0.2, 0.2 * u, 0.0))
            x = flat.view(b, v, n, d)
        return pool_views(self.pool, x, lengths.view(b, v))

    def forward(self, tokens: torch.Tensor, img_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, [1 +] s*s, F) -> views (B, V, D). The projection acts per token, so it runs once on
        all tokens before the views are gathered."""
        return self.pool_selected(self.select(self.proj(tokens), img_ids), project=False)


# ------------------------------------------------------------------------------------ AEOM + Sinkhorn
def log_sinkhorn(scores: torch.Tensor, dustbin: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Log-domain Sinkhorn with a dustbin row and column (SuperGlue's formulation) on (..., M, Q) scores.
    Returns the (..., M, Q) log transport plan scaled so that a unit matched with certainty has 0
    (probability 1)."""
    *lead, m, q = scores.shape
    alpha = dustbin.to(scores.dtype)
    couplings = torch.cat([torch.cat([scores, alpha.expand(*lead, m, 1)], -1),
                           torch.cat([alpha.expand(*lead, 1, q), alpha.expand(*lead, 1, 1)], -1)], -2)
    norm = -math.log(m + q)
    log_mu = scores.new_full((m + 1,), norm)
    log_mu[-1] = math.log(q) + norm
    log_nu = scores.new_full((q + 1,), norm)
    log_nu[-1] = math.log(m) + norm
    u = torch.zeros_like(couplings[..., :, 0])
    v = torch.zeros_like(couplings[..., 0, :])
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v[..., None, :], dim=-1)
        v = log_nu - torch.logsumexp(couplings + u[..., :, None], dim=-2)
    plan = couplings + u[..., :, None] + v[..., None, :] - norm
    return plan[..., :m, :q]


def aeom_reference(img: torch.Tensor, txt: torch.Tensor, unit_dim: int, dustbin: torch.Tensor | None = None,
                   sinkhorn_iters: int = 20, block: int = 64) -> torch.Tensor:
    """AEOM [paper + code]: S[a, b] = sum_j max_i A[a, b, i, j], A = cosine of the L2-normalised units
    (contiguous blocks of unit_dim). With `dustbin` given, A is first weighted by the Sinkhorn plan:
    A * exp(log_sinkhorn(A)). (Ni, Di), (Nt, Dt) -> (Ni, Nt) in float32 (float64 for float64 inputs).
    The (block, Nt, M, Q) unit tensor is built `block` images at a time."""
    out_dtype = torch.float64 if img.dtype == torch.float64 else torch.float32
    iu = F.normalize(img.reshape(img.size(0), -1, unit_dim), dim=-1)
    tu = F.normalize(txt.reshape(txt.size(0), -1, unit_dim), dim=-1)
    rows = []
    for s in range(0, iu.size(0), block):
        a = torch.einsum("aid,bjd->abij", iu[s:s + block], tu)
        if dustbin is not None:
            a = a * log_sinkhorn(a, dustbin, sinkhorn_iters).exp()
        rows.append(a.max(dim=2).values.sum(dim=2))
    return torch.cat(rows).to(out_dtype)


# ------------------------------------------------------------------------------------------- L_reg
def view_regularizer(views: torch.Tensor, lam: float = 0.005, form: str = "paper") -> torch.Tensor:
    """L_reg [paper] between consecutive views of (B, V, D) view embeddings:
    C_kl = sum_b z1[b,k] z2[b,l] / (||z1[:,k]|| ||z2[:,l]||), L = sum_k (1 - C_kk)^2 + lam sum_{k!=l} C_kl^2.
    form "code": C / B (the released code; its diagonal term is then nearly constant).
    [ours] with V > 2 views: the mean over the V - 1 consecutive pairs (v, v + 1). V = 1: 0."""
    if form not in ("paper", "code"):
        raise ValueError(f"reg_form must be 'paper' or 'code', got {form!r}")
    b, v, _ = views.shape
    if v < 2:
        return views.new_zeros(())
    z = F.normalize(views.float(), dim=0, eps=1e-12)  # unit columns over the batch
    c = torch.einsum("bpk,bpl->pkl", z[:, :-1], z[:, 1:])  # (V-1, D, D)
    if form == "code":
        c = c / b
    diag = c.diagonal(dim1=1, dim2=2)
    on = (1 - diag).pow(2).sum((1,))
    off = c.pow(2).sum((1, 2)) - diag.pow(2).sum(1)
    return (on + lam * off).mean()
