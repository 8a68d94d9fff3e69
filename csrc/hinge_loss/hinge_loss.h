// Hinge triplet loss with hard negatives (VSE++): shared declarations of the CPU and CUDA kernels.
//
// Two ops share the kernels. hinge_triplet_loss_fwd takes the (B, B) score matrix; hinge_triplet_loss_emb_fwd
// takes the embeddings and streams the matrix in row tiles computed by a GEMM, never holding all of it.
// Both work on a *row tile*: rows [row0, row0 + rows) of the B x B score matrix, given the positives
// (the diagonal) for all B indices. The square op is a single tile.
//
// Outputs of both forwards:
//   loss      0-dim, the input dtype: sum of the row terms plus sum of the column terms
//   row_stat  (B,) int64. Max mode: the hardest negative caption of each image row, or -1 when the row's
//             hinge is inactive (no negative, or violation <= 0). Sum mode: the number of active terms.
//   col_stat  (B,) int64: the same for each caption column (its hardest negative image).
// In max mode the backward needs only these statistics: O(B) work for the matrix op, O(B * D) gathers
// for the embedding op.
//
// Non-finite scores behave as in the reference (naive.py), IEEE arithmetic in the same order: a NaN cost
// of a negative pair makes its row/column term NaN (in max mode it wins the max at its index, the lowest
// NaN index, like torch.max), and it is an active hinge, since relu's backward passes the gradient
// wherever its output is not <= 0. Masked pairs are never read, so their NaNs change nothing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

namespace vse_kernels::hinge_loss {

// margin + s - positive, evaluated in the reference's order so that ties and rounding agree with it.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t hinge_cost(acc_t margin, acc_t s, acc_t positive) {
  return (margin + s) - positive;
}

// (i, j) is a negative pair: not the diagonal and, with img_ids, not the same image.
C10_HOST_DEVICE inline bool is_negative(const int64_t* img_ids, int64_t i, int64_t j) {
  return i != j && (img_ids == nullptr || img_ids[i] != img_ids[j]);
}

template <typename acc_t>
C10_HOST_DEVICE inline bool is_nan(acc_t x) {
  return x != x;
}
template <typename acc_t>
C10_HOST_DEVICE inline bool is_finite(acc_t x) {
  return !is_nan(x - x);  // inf - inf is NaN too
}

// The hinge is active (its term counts and takes the gradient) unless relu(cost) is exactly 0: NaN is active.
template <typename acc_t>
C10_HOST_DEVICE inline bool is_active(acc_t cost) {
  return !(cost <= acc_t(0));
}

// Running reduction of one row or column: the max with its arg (torch.max's order: NaN above every number,
// the lowest index on ties, NaNs included), or the sum of the active terms with their count.
template <typename acc_t>
struct Reduction {
  acc_t value;
  int64_t stat;  // max mode: -1 while empty (value -inf)

  C10_HOST_DEVICE static Reduction start(bool max_violation) {
    return {max_violation ? -std::numeric_limits<acc_t>::infinity() : acc_t(0), max_violation ? -1 : 0};
  }
  // Whether (cost, index) replaces the current max; a -inf cost never fills an empty one (relu makes it 0).
  C10_HOST_DEVICE bool beaten_by(acc_t cost, int64_t index) const {
    if (is_nan(value)) return is_nan(cost) && index < stat;
    return is_nan(cost) || cost > value || (cost == value && index < stat);
  }
  C10_HOST_DEVICE void add(acc_t cost, int64_t index, bool max_violation) {
    if (max_violation) {
      if (beaten_by(cost, index)) value = cost, stat = index;
    } else if (is_active(cost)) {
      value += cost, ++stat;
    }
  }
  C10_HOST_DEVICE void merge(const Reduction& other, bool max_violation) {
    if (!max_violation) {
      value += other.value, stat += other.stat;
    } else if (other.stat >= 0) {
      add(other.value, other.stat, true);
    }
  }
  // The loss term and the saved statistic; an inactive hardest negative is (0, -1).
  C10_HOST_DEVICE void finish(bool max_violation, acc_t* term, int64_t* stat_out) const {
    const bool active = !max_violation || is_active(value);
    *term = active ? value : acc_t(0);
    *stat_out = active ? stat : -1;
  }
};

// Rows [row0, row0 + rows) of the B x B score matrix (contiguous), with the positives of all B indices.
template <typename scalar_t, typename acc_t>
struct Tile {
  const scalar_t* scores;
  int64_t rows, row0, batch;
  const acc_t* positive;
  const int64_t* ids;
  acc_t margin;

  C10_HOST_DEVICE acc_t score(int64_t r, int64_t j) const { return static_cast<acc_t>(scores[r * batch + j]); }

  // Sum mode: d loss / d scores[row0 + r, j] for upstream gradient g, from the forward's active-term counts
  // (the diagonal's) or the two hinges of the pair.
  C10_HOST_DEVICE acc_t dense_grad(int64_t r, int64_t j, acc_t g, const int64_t* row_count,
                                   const int64_t* col_count) const {
    const int64_t i = row0 + r;
    if (i == j) return -g * static_cast<acc_t>(row_count[i] + col_count[i]);
    if (!is_negative(ids, i, j)) return acc_t(0);
    const acc_t s = score(r, j);
    return g * static_cast<acc_t>(is_active(hinge_cost(margin, s, positive[i])) +
                                  is_active(hinge_cost(margin, s, positive[j])));
  }
};

// Max mode, embedding op backward, one side. For image k (X = txt, own = row_stat, other = col_stat):
//   d img_k = g * ([own_k >= 0] (X[own_k] - X[k]) + sum_{j : other_j = k} X[j] - [other_k >= 0] X[k]),
// and symmetrically for captions; the middle sum runs over the inverse list of `other` at k, order[offsets[k]
// : offsets[k + 1]] (a stable sort: fixed order, deterministic). The reference computes the dense product
// d scores @ X, where every zero of d scores times a non-finite X[j, d] is NaN: so is the result wherever
// column d of X has a non-finite entry (nonfinite[d] of them) in a row this sum does not read.
template <typename scalar_t, typename acc_t>
struct GatherGrad {
  const scalar_t* X;
  const int64_t *own, *other, *order, *offsets, *nonfinite;
  int64_t dim;

  C10_HOST_DEVICE acc_t operator()(int64_t k, int64_t d, acc_t g) const {
    auto x = [&](int64_t row) { return static_cast<acc_t>(X[row * dim + d]); };
    auto nonfinite_at = [&](int64_t row) { return int64_t(!is_finite(x(row))); };
    acc_t v = 0;
    int64_t nonfinite_read = 0;  // among the distinct rows read
    if (own[k] >= 0) v += x(own[k]) - x(k), nonfinite_read += nonfinite_at(own[k]);
    for (int64_t p = offsets[k]; p < offsets[k + 1]; ++p) {
      v += x(order[p]);
      if (order[p] != own[k]) nonfinite_read += nonfinite_at(order[p]);  // own_k may point back at k
    }
    if (other[k] >= 0) v -= x(k);
    if (own[k] >= 0 || other[k] >= 0) nonfinite_read += nonfinite_at(k);
    return nonfinite[d] > nonfinite_read ? std::numeric_limits<acc_t>::quiet_NaN() : g * v;
  }
};

// Rows of the score matrix per tile for the embedding op: a tile of up to 2^26 scores (256 MiB in
// float32) keeps the GEMMs large while memory stays far below the B x B matrix.
inline int64_t tile_rows(int64_t batch) {
  constexpr int64_t kTileElements = int64_t(1) << 26;
  return std::max<int64_t>(1, std::min<int64_t>(batch, kTileElements / std::max<int64_t>(batch, 1)));
}

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const int64_t* ids_ptr(const at::Tensor& ids);                          // nullptr when undefined
at::Tensor contiguous_ids(const std::optional<at::Tensor>& img_ids);   // undefined when absent
// The positives <img_i, txt_i> of the embedding op, rounded to the input dtype as a GEMM's output is.
at::Tensor positives(const at::Tensor& img, const at::Tensor& txt, at::ScalarType acc);
// (D,) int64: the non-finite entries of each column of a (B, D) matrix, for GatherGrad.
at::Tensor nonfinite_per_column(const at::Tensor& x);
// For each k, the indices whose statistic points at k, as (order, offsets) lists (inactive -1 sorts first).
std::tuple<at::Tensor, at::Tensor> inverse_lists(const at::Tensor& stat);

// TORCH_CHECKs on shapes, dtypes, devices and a finite margin; every message names the argument.
void check_scores(const at::Tensor& scores, double margin, const std::optional<at::Tensor>& img_ids);
void check_embeddings(const at::Tensor& img, const at::Tensor& txt, double margin,
                      const std::optional<at::Tensor>& img_ids);
void check_backward(const at::Tensor& grad, int64_t batch, const at::Tensor& row_stat, const at::Tensor& col_stat,
                    const at::Device& device);

#ifdef VSE_WITH_CUDA
Forward forward_cuda(const at::Tensor& scores, double margin, bool max_violation,
                     const std::optional<at::Tensor>& img_ids);
at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& scores, double margin, bool max_violation,
                         const std::optional<at::Tensor>& img_ids, const at::Tensor& row_stat,
                         const at::Tensor& col_stat);
Forward embeddings_forward_cuda(const at::Tensor& img, const at::Tensor& txt, double margin, bool max_violation,
                                const std::optional<at::Tensor>& img_ids);
std::tuple<at::Tensor, at::Tensor> embeddings_backward_cuda(const at::Tensor& grad, const at::Tensor& img,
                                                            const at::Tensor& txt, double margin,
                                                            bool max_violation,
                                                            const std::optional<at::Tensor>& img_ids,
                                                            const at::Tensor& row_stat, const at::Tensor& col_stat);
#endif

}  // namespace vse_kernels::hinge_loss
