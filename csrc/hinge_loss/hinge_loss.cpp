// Hinge triplet loss with hard negatives: schemas and CPU kernels (forward and backward).
#include "hinge_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace vse_kernels::hinge_loss {

void check_inputs(const at::Tensor& scores, const std::optional<at::Tensor>& img_ids) {
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == scores.size(1),
              "hinge_triplet_loss: scores must be a square (B, B) matrix, got shape ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()),
              "hinge_triplet_loss: scores must be floating point, got ", scores.scalar_type());
  if (img_ids.has_value()) {
    const at::Tensor& ids = *img_ids;
    TORCH_CHECK(ids.dim() == 1 && ids.size(0) == scores.size(0), "hinge_triplet_loss: img_ids must have shape (",
                scores.size(0), ",), got ", ids.sizes());
    TORCH_CHECK(ids.scalar_type() == at::kLong, "hinge_triplet_loss: img_ids must be int64, got ",
                ids.scalar_type());
    TORCH_CHECK(ids.device() == scores.device(), "hinge_triplet_loss: img_ids is on ", ids.device(),
                " but scores is on ", scores.device());
  }
}

void check_stats(const at::Tensor& scores, const at::Tensor& row_stat, const at::Tensor& col_stat) {
  for (const at::Tensor* t : {&row_stat, &col_stat}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == scores.size(0) && t->scalar_type() == at::kLong &&
                    t->device() == scores.device(),
                "hinge_triplet_loss_bwd: row_stat/col_stat must be int64 (B,) on ", scores.device(), ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

namespace {

constexpr int64_t kColumnBlock = 64;  // columns swept together: one cache line run per row

// Row terms: for image i, the hardest (or every) caption j ranked against its positive S[i, i].
template <typename scalar_t, typename acc_t>
void rows_cpu(const scalar_t* S, const int64_t* ids, int64_t B, acc_t margin, bool max_violation, acc_t* value,
              int64_t* stat) {
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = S + i * B;
      const acc_t positive = static_cast<acc_t>(row[i]);
      acc_t best = -std::numeric_limits<acc_t>::infinity(), total = 0;
      int64_t arg = -1, active = 0;
      for (int64_t j = 0; j < B; ++j) {
        if (!is_negative(ids, i, j)) continue;
        const acc_t c = hinge_cost(margin, static_cast<acc_t>(row[j]), positive);
        if (max_violation) {
          if (c > best) best = c, arg = j;  // strict: the lowest index wins ties
        } else if (c > 0) {
          total += c, ++active;
        }
      }
      value[i] = max_violation ? (best > 0 ? best : acc_t(0)) : total;
      stat[i] = max_violation ? arg : active;
    }
  });
}

// Column terms: for caption j, the hardest (or every) image i ranked against its positive S[j, j].
// Swept in blocks of columns, rows in order, so reads stay contiguous and ties go to the lowest row.
template <typename scalar_t, typename acc_t>
void columns_cpu(const scalar_t* S, const int64_t* ids, int64_t B, acc_t margin, bool max_violation,
                 acc_t* value, int64_t* stat) {
  const int64_t blocks = (B + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    acc_t best[kColumnBlock], total[kColumnBlock], positive[kColumnBlock];
    int64_t arg[kColumnBlock], active[kColumnBlock];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t j0 = block * kColumnBlock, width = std::min(kColumnBlock, B - j0);
      for (int64_t c = 0; c < width; ++c) {
        best[c] = -std::numeric_limits<acc_t>::infinity(), total[c] = 0, arg[c] = -1, active[c] = 0;
        positive[c] = static_cast<acc_t>(S[(j0 + c) * B + j0 + c]);
      }
      for (int64_t i = 0; i < B; ++i) {
        const scalar_t* row = S + i * B + j0;
        for (int64_t c = 0; c < width; ++c) {
          if (!is_negative(ids, i, j0 + c)) continue;
          const acc_t cost = hinge_cost(margin, static_cast<acc_t>(row[c]), positive[c]);
          if (max_violation) {
            if (cost > best[c]) best[c] = cost, arg[c] = i;
          } else if (cost > 0) {
            total[c] += cost, ++active[c];
          }
        }
      }
      for (int64_t c = 0; c < width; ++c) {
        value[j0 + c] = max_violation ? (best[c] > 0 ? best[c] : acc_t(0)) : total[c];
        stat[j0 + c] = max_violation ? arg[c] : active[c];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& scores_in, double margin,
                                                           bool max_violation,
                                                           const std::optional<at::Tensor>& img_ids) {
  check_inputs(scores_in, img_ids);
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor ids = img_ids.has_value() ? img_ids->contiguous() : at::Tensor();
  const int64_t B = scores.size(0);
  at::Tensor loss = at::empty({}, scores.options());
  at::Tensor row_stat = at::empty({B}, scores.options().dtype(at::kLong));
  at::Tensor col_stat = at::empty({B}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> row_value(B), col_value(B);
    const int64_t* id_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
    rows_cpu<scalar_t, acc_t>(scores.const_data_ptr<scalar_t>(), id_ptr, B, static_cast<acc_t>(margin),
                              max_violation, row_value.data(), row_stat.mutable_data_ptr<int64_t>());
    columns_cpu<scalar_t, acc_t>(scores.const_data_ptr<scalar_t>(), id_ptr, B, static_cast<acc_t>(margin),
                                 max_violation, col_value.data(), col_stat.mutable_data_ptr<int64_t>());
    double sum = 0;  // fixed order: deterministic whatever the thread count
    for (int64_t k = 0; k < B; ++k) sum += static_cast<double>(row_value[k]) + static_cast<double>(col_value[k]);
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum);
  });
  return {loss, row_stat, col_stat};
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& scores_in, double margin, bool max_violation,
                        const std::optional<at::Tensor>& img_ids, const at::Tensor& row_stat_in,
                        const at::Tensor& col_stat_in) {
  check_inputs(scores_in, img_ids);
  check_stats(scores_in, row_stat_in, col_stat_in);
  TORCH_CHECK(grad.numel() == 1, "hinge_triplet_loss_bwd: grad must hold one element, got ", grad.sizes());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor ids = img_ids.has_value() ? img_ids->contiguous() : at::Tensor();
  const at::Tensor row_stat = row_stat_in.contiguous(), col_stat = col_stat_in.contiguous();
  const int64_t B = scores.size(0);
  at::Tensor grad_scores = at::zeros({B, B}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    scalar_t* G = grad_scores.mutable_data_ptr<scalar_t>();
    const int64_t* id_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
    const int64_t *rows = row_stat.const_data_ptr<int64_t>(), *cols = col_stat.const_data_ptr<int64_t>();
    const acc_t g = grad.item<acc_t>(), m = static_cast<acc_t>(margin);
    auto s = [&](int64_t i, int64_t j) { return static_cast<acc_t>(S[i * B + j]); };
    if (max_violation) {
      // Each active hinge sends +g to its hardest negative and -g to its positive (the diagonal).
      for (int64_t i = 0; i < B; ++i) {
        const int64_t j = rows[i];
        if (j >= 0 && hinge_cost(m, s(i, j), s(i, i)) > 0) {
          G[i * B + j] = static_cast<acc_t>(G[i * B + j]) + g;
          G[i * B + i] = static_cast<acc_t>(G[i * B + i]) - g;
        }
      }
      for (int64_t j = 0; j < B; ++j) {
        const int64_t i = cols[j];
        if (i >= 0 && hinge_cost(m, s(i, j), s(j, j)) > 0) {
          G[i * B + j] = static_cast<acc_t>(G[i * B + j]) + g;
          G[j * B + j] = static_cast<acc_t>(G[j * B + j]) - g;
        }
      }
      return;
    }
    // Sum mode: every active hinge counts once; the diagonal collects the saved per-row/column counts.
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < B; ++j) {
          acc_t v;
          if (i == j) {
            v = -g * static_cast<acc_t>(rows[i] + cols[i]);
          } else if (is_negative(id_ptr, i, j)) {
            v = g * static_cast<acc_t>((hinge_cost(m, s(i, j), s(i, i)) > 0) + (hinge_cost(m, s(i, j), s(j, j)) > 0));
          } else {
            continue;
          }
          G[i * B + j] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vse_kernels, m) {
  m.def("hinge_triplet_loss_fwd(Tensor scores, float margin, bool max_violation, Tensor? img_ids) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("hinge_triplet_loss_bwd(Tensor grad, Tensor scores, float margin, bool max_violation, Tensor? img_ids, "
        "Tensor row_stat, Tensor col_stat) -> Tensor");
}

TORCH_LIBRARY_IMPL(vse_kernels, CPU, m) {
  m.impl("hinge_triplet_loss_fwd", &forward_cpu);
  m.impl("hinge_triplet_loss_bwd", &backward_cpu);
}

#ifdef VSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vse_kernels, CUDA, m) {
  m.impl("hinge_triplet_loss_fwd", &forward_cuda);
  m.impl("hinge_triplet_loss_bwd", &backward_cuda);
}
#endif

}  // namespace vse_kernels::hinge_loss
