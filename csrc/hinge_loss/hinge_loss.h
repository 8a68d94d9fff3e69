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

// Running reduction of one row or column: the max with its arg (lowest index on ties), or the sum of the
// active (> 0) terms with their count.
template <typename acc_t>
struct Reduction {
  acc_t value;
  int64_t stat;

  C10_HOST_DEVICE static Reduction start(bool max_violation) {
    return {max_violation ? -std::numeric_limits<acc_t>::infinity() : acc_t(0), max_violation ? -1 : 0};
  }
  C10_HOST_DEVICE void add(acc_t cost, int64_t index, bool max_violation) {
    if (max_violation) {
      if (cost > value || (cost == value && stat >= 0 && index < stat)) value = cost, stat = index;
    } else if (cost > 0) {
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
    const bool active = !max_violation || value > acc_t(0);
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

// TORCH_CHECKs on shapes, dtypes and devices; every message names the argument.
void check_scores(const at::Tensor& scores, const std::optional<at::Tensor>& img_ids);
void check_embeddings(const at::Tensor& img, const at::Tensor& txt, const std::optional<at::Tensor>& img_ids);
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
