"""Blocked PyTorch implementation of meta_sim for CPU tensors (also CUDA float64, which Triton skips).

Works on unit tensors img (Ni, M, d) and txt (Nt, Q, d) that are already normalised if asked. The
(Ni, Nt, M, Q) unit-similarity tensor is computed one block of image-text pairs at a time with a matmul,
reduced at once, and dropped: memory is O(Ni*Nt) for the result (plus O(Ni*Nt*Q) for the saved arg-max
when a gradient is needed) and a fixed block of BLOCK_ELEMENTS. Half/bfloat16 are computed in float32.
"""

from __future__ import annotations

import torch

from .naive import result_dtype

BLOCK_ELEMENTS = 1 << 22  # unit similarities per block: 16 MiB in float32


def _blocks(ni: int, nt: int, m: int, q: int) -> tuple[int, int]:
    """(image rows, text columns) per block so that rows * m * cols * q <= BLOCK_ELEMENTS (at least 1 x 1)."""
    cols = max(1, min(nt, BLOCK_ELEMENTS // (m * q)))
    rows = max(1, min(ni, BLOCK_ELEMENTS // (m * q * cols)))
    return rows, cols


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def meta_sim_forward(img: torch.Tensor, txt: torch.Tensor, with_argmax: bool):
    """(S (Ni, Nt), argmax (Ni, Nt, Q) int32, or an empty (0,) tensor without with_argmax)."""
    (ni, m, d), (nt, q, _) = img.shape, txt.shape
    dtype = _compute_dtype(img.dtype)
    scores = torch.empty((ni, nt), dtype=result_dtype(img.dtype), device=img.device)
    argmax = torch.empty((ni, nt, q) if with_argmax else (0,), dtype=torch.int32, device=img.device)
    rows, cols = _blocks(ni, nt, m, q)
    for t0 in range(0, nt, cols):
        t1 = min(nt, t0 + cols)
        txt_block = txt[t0:t1].to(dtype).reshape((t1 - t0) * q, d)  # (cols*Q, d)
        for i0 in range(0, ni, rows):
            i1 = min(ni, i0 + rows)
            img_block = img[i0:i1].to(dtype).reshape((i1 - i0) * m, d)
            sims = (img_block @ txt_block.T).view(i1 - i0, m, t1 - t0, q)
            if with_argmax:
                best, index = sims.max(dim=1)  # lowest index on ties
                argmax[i0:i1, t0:t1] = index
            else:
                best = sims.amax(dim=1)
            scores[i0:i1, t0:t1] = best.sum(dim=2)
    return scores, argmax


def meta_sim_backward(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, argmax: torch.Tensor):
    """Gradients (like img, like txt) of sum(grad * S): dS[a, b] is routed to the arg-max unit of (a, b, j).

    Per block, W[a, i, b, j] = dS[a, b] * [argmax[a, b, j] == i]; then dImg = W @ txt and dTxt = W^T @ img,
    accumulated block by block in a fixed order (deterministic)."""
    (ni, m, d), (nt, q, _) = img.shape, txt.shape
    dtype = _compute_dtype(img.dtype)
    grad = grad.to(dtype)
    grad_img = torch.zeros((ni, m, d), dtype=dtype, device=img.device)
    grad_txt = torch.zeros((nt, q, d), dtype=dtype, device=img.device)
    rows, cols = _blocks(ni, nt, m, q)
    for t0 in range(0, nt, cols):
        t1 = min(nt, t0 + cols)
        txt_block = txt[t0:t1].to(dtype).reshape((t1 - t0) * q, d)
        for i0 in range(0, ni, rows):
            i1 = min(ni, i0 + rows)
            img_block = img[i0:i1].to(dtype).reshape((i1 - i0) * m, d)
            weights = torch.zeros((i1 - i0, m, t1 - t0, q), dtype=dtype, device=img.device)
            index = argmax[i0:i1, t0:t1].long().unsqueeze(1)  # (rows, 1, cols, Q)
            source = grad[i0:i1, t0:t1, None].expand(-1, -1, q).unsqueeze(1)  # dS[a, b] for every j
            weights.scatter_(1, index, source)
            weights = weights.view((i1 - i0) * m, (t1 - t0) * q)
            grad_img[i0:i1].view(-1, d).addmm_(weights, txt_block)
            grad_txt[t0:t1].view(-1, d).addmm_(weights.T, img_block)
    return grad_img.to(img.dtype), grad_txt.to(txt.dtype)
