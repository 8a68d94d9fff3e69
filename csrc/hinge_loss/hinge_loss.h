// Hinge triplet loss with hard negatives (VSE++), shared declarations for the CPU and CUDA kernels.
//
// Op outputs (see vse_kernels/ops/hinge_loss/op.py for the schema):
//   loss      0-dim, dtype of scores: sum over rows of the row term plus sum over columns of the column term
//   row_stat  (B,) int64: max mode: arg-max caption of each image row (-1: no valid negative);
//                          sum mode: number of active (> 0) hinge terms in the row
//   col_stat  (B,) int64: the same for each caption column
// The backward needs only these statistics and the scores: O(B) work in max mode.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

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

// TORCH_CHECKs on shapes, dtypes and devices; names the argument in every message.
void check_inputs(const at::Tensor& scores, const std::optional<at::Tensor>& img_ids);
void check_stats(const at::Tensor& scores, const at::Tensor& row_stat, const at::Tensor& col_stat);

#ifdef VSE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& scores, double margin, bool max_violation, const std::optional<at::Tensor>& img_ids);
at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& scores, double margin, bool max_violation,
                         const std::optional<at::Tensor>& img_ids, const at::Tensor& row_stat,
                         const at::Tensor& col_stat);
#endif

}  // namespace vse_kernels::hinge_loss
