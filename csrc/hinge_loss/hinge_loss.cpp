// Hinge triplet loss with hard negatives: schemas and CPU kernels for the matrix and embedding ops.
#include "hinge_loss.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace vse_kernels::hinge_loss {

void check_scores(const at::Tensor& scores, double margin, const std::optional<at::Tensor>& img_ids) {
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == scores.size(1),
              "hinge_triplet_loss: scores must be a square (B, B) matrix, got shape ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()),
              "hinge_triplet_loss: scores must be floating point, got ", scores.scalar_type());
  TORCH_CHECK(std::isfinite(margin), "hinge_triplet_loss: margin must be finite, got ", margin);
  if (img_ids.has_value()) {
    const at::Tensor& ids = *img_ids;
    TORCH_CHECK(ids.dim() == 1 && ids.size(0) == scores.size(0), "hinge_triplet_loss: img_ids must have shape (",
                scores.size(0), ",), got ", ids.sizes());
    TORCH_CHECK(ids.scalar_type() == at::kLong, "hinge_triplet_loss: img_ids must be int64, got ",
                ids.scalar_type());
    TORCH_CHECK(ids.device() == scores.device(), "hinge_triplet_loss: img_ids is on ", ids.device(),
                " but the scores are on ", scores.device());
  }
}

void check_embeddings(const at::Tensor& img, const at::Tensor& txt, double margin,
                      const std::optional<at::Tensor>& img_ids) {
  TORCH_CHECK(std::isfinite(margin), "hinge_triplet_loss_embeddings: margin must be finite, got ", margin);
  TORCH_CHECK(img.dim() == 2 && txt.dim() == 2 && img.sizes() == txt.sizes(),
              "hinge_triplet_loss_embeddings: img and txt must both be (B, D), got ", img.sizes(), " and ",
              txt.sizes());
  TORCH_CHECK(img.scalar_type() == txt.scalar_type() && at::isFloatingType(img.scalar_type()),
              "hinge_triplet_loss_embeddings: img and txt must share one floating dtype, got ", img.scalar_type(),
              " and ", txt.scalar_type());
  TORCH_CHECK(img.device() == txt.device(), "hinge_triplet_loss_embeddings: img is on ", img.device(),
              " but txt is on ", txt.device());
  if (img_ids.has_value()) {
    TORCH_CHECK(img_ids->dim() == 1 && img_ids->size(0) == img.size(0) && img_ids->scalar_type() == at::kLong &&
                    img_ids->device() == img.device(),
                "hinge_triplet_loss_embeddings: img_ids must be int64 (", img.size(0), ",) on ", img.device(),
                ", got ", img_ids->scalar_type(), " ", img_ids->sizes(), " on ", img_ids->device());
  }
}

void check_backward(const at::Tensor& grad, int64_t batch, const at::Tensor& row_stat, const at::Tensor& col_stat,
                    const at::Device& device) {
  TORCH_CHECK(grad.numel() == 1 && grad.device() == device, "hinge_triplet_loss backward: grad must be one element on ",
              device, ", got ", grad.sizes(), " on ", grad.device());
  for (const at::Tensor* t : {&row_stat, &col_stat}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && t->scalar_type() == at::kLong && t->device() == device,
                "hinge_triplet_loss backward: row_stat/col_stat must be int64 (", batch, ",) on ", device, ", got ",
                t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

const int64_t* ids_ptr(const at::Tensor& ids) { return ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr; }
at::Tensor contiguous_ids(const std::optional<at::Tensor>& img_ids) {
  return img_ids.has_value() ? img_ids->contiguous() : at::Tensor();
}

at::Tensor positives(const at::Tensor& img, const at::Tensor& txt, at::ScalarType acc) {
  return (img.to(acc) * txt.to(acc)).sum(1).to(img.scalar_type()).to(acc).contiguous();
}

at::Tensor nonfinite_per_column(const at::Tensor& x) { return x.size(0) - at::isfinite(x).sum(0); }

std::tuple<at::Tensor, at::Tensor> inverse_lists(const at::Tensor& stat) {
  const auto [sorted, order] = at::sort(stat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor offsets = at::searchsorted(sorted, at::arange(stat.size(0) + 1, stat.options()));
  return {order, offsets};
}

namespace {

constexpr int64_t kColumnBlock = 64;  // columns swept together: one contiguous run per row

// Everything the forward accumulates over the tiles: row terms are final per tile, columns run on.
template <typename acc_t>
struct ForwardState {
  bool max_violation;
  std::vector<acc_t> positive, row_term;
  std::vector<Reduction<acc_t>> columns;

  ForwardState(int64_t batch, bool max_violation)
      : max_violation(max_violation), positive(batch), row_term(batch),
        columns(batch, Reduction<acc_t>::start(max_violation)) {}

  template <typename scalar_t>
  void add_tile(const Tile<scalar_t, acc_t>& t, int64_t* row_stat) {
    at::parallel_for(0, t.rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = t.row0 + r;
        Reduction<acc_t> row = Reduction<acc_t>::start(max_violation);
        for (int64_t j = 0; j < t.batch; ++j) {
          if (is_negative(t.ids, i, j)) row.add(hinge_cost(t.margin, t.score(r, j), positive[i]), j, max_violation);
        }
        row.finish(max_violation, &row_term[i], &row_stat[i]);
      }
    });
    // Columns in blocks, rows in order: reads stay contiguous and ties go to the lowest row.
    const int64_t blocks = (t.batch + kColumnBlock - 1) / kColumnBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t j0 = block * kColumnBlock, j1 = std::min(t.batch, j0 + kColumnBlock);
        for (int64_t r = 0; r < t.rows; ++r) {
          const int64_t i = t.row0 + r;
          for (int64_t j = j0; j < j1; ++j) {
            if (is_negative(t.ids, i, j)) columns[j].add(hinge_cost(t.margin, t.score(r, j), positive[j]), i, max_violation);
          }
        }
      }
    });
  }

  template <typename scalar_t>
  void finish(at::Tensor& loss, int64_t* col_stat) {
    double sum = 0;  // fixed order: deterministic whatever the thread count
    for (size_t k = 0; k < columns.size(); ++k) {
      acc_t col_term;
      columns[k].finish(max_violation, &col_term, &col_stat[k]);
      sum += static_cast<double>(row_term[k]) + static_cast<double>(col_term);
    }
    *loss.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(sum);
  }
};

// Sum mode: d loss / d scores on one tile (Tile::dense_grad).
template <typename scalar_t, typename acc_t>
void dense_grad_tile(const Tile<scalar_t, acc_t>& t, acc_t g, const int64_t* row_count, const int64_t* col_count,
                     scalar_t* out) {
  at::parallel_for(0, t.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < t.batch; ++j) {
        out[r * t.batch + j] = static_cast<scalar_t>(t.dense_grad(r, j, g, row_count, col_count));
      }
    }
  });
}

Forward forward_cpu(const at::Tensor& scores_in, double margin, bool max_violation,
                    const std::optional<at::Tensor>& img_ids) {
  check_scores(scores_in, margin, img_ids);
  const at::Tensor scores = scores_in.contiguous(), ids = contiguous_ids(img_ids);
  const int64_t B = scores.size(0);
  at::Tensor loss = at::empty({}, scores.options());
  at::Tensor row_stat = at::empty({B}, scores.options().dtype(at::kLong)), col_stat = at::empty_like(row_stat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    ForwardState<acc_t> state(B, max_violation);
    for (int64_t i = 0; i < B; ++i) state.positive[i] = static_cast<acc_t>(S[i * B + i]);
    const Tile<scalar_t, acc_t> tile{S, B, 0, B, state.positive.data(), ids_ptr(ids), static_cast<acc_t>(margin)};
    state.add_tile(tile, row_stat.mutable_data_ptr<int64_t>());
    state.template finish<scalar_t>(loss, col_stat.mutable_data_ptr<int64_t>());
  });
  return {loss, row_stat, col_stat};
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& scores_in, double margin, bool max_violation,
                        const std::optional<at::Tensor>& img_ids, const at::Tensor& row_stat_in,
                        const at::Tensor& col_stat_in) {
  check_scores(scores_in, margin, img_ids);
  check_backward(grad, scores_in.size(0), row_stat_in, col_stat_in, scores_in.device());
  const at::Tensor scores = scores_in.contiguous(), ids = contiguous_ids(img_ids);
  const at::Tensor row_stat = row_stat_in.contiguous(), col_stat = col_stat_in.contiguous();
  const int64_t B = scores.size(0);
  at::Tensor grad_scores = at::zeros({B, B}, scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t g = grad.item<acc_t>();
    const int64_t *rows = row_stat.const_data_ptr<int64_t>(), *cols = col_stat.const_data_ptr<int64_t>();
    scalar_t* G = grad_scores.mutable_data_ptr<scalar_t>();
    if (max_violation) {
      // Each active hinge sends +g to its hardest negative and -g to its positive.
      auto add = [&](int64_t i, int64_t j, acc_t v) { G[i * B + j] = static_cast<acc_t>(G[i * B + j]) + v; };
      for (int64_t i = 0; i < B; ++i) {
        if (rows[i] >= 0) add(i, rows[i], g), add(i, i, -g);
      }
      for (int64_t j = 0; j < B; ++j) {
        if (cols[j] >= 0) add(cols[j], j, g), add(j, j, -g);
      }
      return;
    }
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    std::vector<acc_t> positive(B);
    for (int64_t i = 0; i < B; ++i) positive[i] = static_cast<acc_t>(S[i * B + i]);
    dense_grad_tile<scalar_t, acc_t>({S, B, 0, B, positive.data(), ids_ptr(ids), static_cast<acc_t>(margin)}, g,
                                     rows, cols, G);
  });
  return grad_scores;
}

Forward embeddings_forward_cpu(const at::Tensor& img_in, const at::Tensor& txt_in, double margin, bool max_violation,
                               const std::optional<at::Tensor>& img_ids) {
  check_embeddings(img_in, txt_in, margin, img_ids);
  const at::Tensor img = img_in.contiguous(), txt = txt_in.contiguous(), ids = contiguous_ids(img_ids);
  const int64_t B = img.size(0), rows = tile_rows(B);
  at::Tensor loss = at::empty({}, img.options());
  at::Tensor row_stat = at::empty({B}, img.options().dtype(at::kLong)), col_stat = at::empty_like(row_stat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "hinge_loss_emb_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardState<acc_t> state(B, max_violation);
    const at::Tensor pos = positives(img, txt, c10::CppTypeToScalarType<acc_t>::value);
    std::copy_n(pos.const_data_ptr<acc_t>(), B, state.positive.begin());
    for (int64_t row0 = 0; row0 < B; row0 += rows) {
      const int64_t n = std::min(rows, B - row0);
      const at::Tensor scores = at::matmul(img.narrow(0, row0, n), txt.t()).contiguous();
      state.add_tile(Tile<scalar_t, acc_t>{scores.const_data_ptr<scalar_t>(), n, row0, B, state.positive.data(),
                                           ids_ptr(ids), static_cast<acc_t>(margin)},
                     row_stat.mutable_data_ptr<int64_t>());
    }
    state.template finish<scalar_t>(loss, col_stat.mutable_data_ptr<int64_t>());
  });
  return {loss, row_stat, col_stat};
}

std::tuple<at::Tensor, at::Tensor> embeddings_backward_cpu(const at::Tensor& grad, const at::Tensor& img_in,
                                                           const at::Tensor& txt_in, double margin,
                                                           bool max_violation,
                                                           const std::optional<at::Tensor>& img_ids,
                                                           const at::Tensor& row_stat_in,
                                                           const at::Tensor& col_stat_in) {
  check_embeddings(img_in, txt_in, margin, img_ids);
  check_backward(grad, img_in.size(0), row_stat_in, col_stat_in, img_in.device());
  const at::Tensor img = img_in.contiguous(), txt = txt_in.contiguous(), ids = contiguous_ids(img_ids);
  const at::Tensor row_stat = row_stat_in.contiguous(), col_stat = col_stat_in.contiguous();
  const int64_t B = img.size(0), D = img.size(1);
  at::Tensor grad_img, grad_txt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "hinge_loss_emb_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const acc_t g = grad.item<acc_t>();
    const int64_t *rows = row_stat.const_data_ptr<int64_t>(), *cols = col_stat.const_data_ptr<int64_t>();
    if (max_violation) {
      // O(B * D) gathers (GatherGrad), each output element written once: parallel and deterministic.
      grad_img = at::empty({B, D}, img.options()), grad_txt = at::empty({B, D}, img.options());
      const auto [by_col_stat, col_offsets] = inverse_lists(col_stat);  // columns whose hardest image is k
      const auto [by_row_stat, row_offsets] = inverse_lists(row_stat);  // rows whose hardest caption is k
      const at::Tensor txt_nonfinite = nonfinite_per_column(txt), img_nonfinite = nonfinite_per_column(img);
      const GatherGrad<scalar_t, acc_t> img_side{txt.const_data_ptr<scalar_t>(), rows, cols,
                                                 by_col_stat.const_data_ptr<int64_t>(),
                                                 col_offsets.const_data_ptr<int64_t>(),
                                                 txt_nonfinite.const_data_ptr<int64_t>(), D};
      const GatherGrad<scalar_t, acc_t> txt_side{img.const_data_ptr<scalar_t>(), cols, rows,
                                                 by_row_stat.const_data_ptr<int64_t>(),
                                                 row_offsets.const_data_ptr<int64_t>(),
                                                 img_nonfinite.const_data_ptr<int64_t>(), D};
      auto gather = [&](const GatherGrad<scalar_t, acc_t>& side, scalar_t* out) {
        at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
          for (int64_t k = begin; k < end; ++k) {
            for (int64_t d = 0; d < D; ++d) out[k * D + d] = static_cast<scalar_t>(side(k, d, g));
          }
        });
      };
      gather(img_side, grad_img.mutable_data_ptr<scalar_t>());
      gather(txt_side, grad_txt.mutable_data_ptr<scalar_t>());
      return;
    }
    // Sum mode: the gradient of the scores is dense; rebuild it tile by tile and multiply through.
    const at::Tensor pos = positives(img, txt, acc);
    const int64_t tile = tile_rows(B);
    grad_img = at::empty({B, D}, img.options());
    at::Tensor gt = at::zeros({B, D}, img.options().dtype(acc));
    for (int64_t row0 = 0; row0 < B; row0 += tile) {
      const int64_t n = std::min(tile, B - row0);
      const at::Tensor block = img.narrow(0, row0, n);
      const at::Tensor scores = at::matmul(block, txt.t()).contiguous();
      at::Tensor grad_scores = at::empty_like(scores);
      dense_grad_tile<scalar_t, acc_t>({scores.const_data_ptr<scalar_t>(), n, row0, B, pos.const_data_ptr<acc_t>(),
                                        ids_ptr(ids), static_cast<acc_t>(margin)},
                                       g, rows, cols, grad_scores.mutable_data_ptr<scalar_t>());
      grad_img.narrow(0, row0, n).copy_(at::matmul(grad_scores, txt));
      gt += at::matmul(grad_scores.t(), block).to(acc);
    }
    grad_txt = gt.to(img.scalar_type());
  });
  return {grad_img, grad_txt};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vse_kernels, m) {
  m.def("hinge_triplet_loss_fwd(Tensor scores, float margin, bool max_violation, Tensor? img_ids) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("hinge_triplet_loss_bwd(Tensor grad, Tensor scores, float margin, bool max_violation, Tensor? img_ids, "
        "Tensor row_stat, Tensor col_stat) -> Tensor");
  m.def("hinge_triplet_loss_emb_fwd(Tensor img, Tensor txt, float margin, bool max_violation, Tensor? img_ids) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("hinge_triplet_loss_emb_bwd(Tensor grad, Tensor img, Tensor txt, float margin, bool max_violation, "
        "Tensor? img_ids, Tensor row_stat, Tensor col_stat) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vse_kernels, CPU, m) {
  m.impl("hinge_triplet_loss_fwd", &forward_cpu);
  m.impl("hinge_triplet_loss_bwd", &backward_cpu);
  m.impl("hinge_triplet_loss_emb_fwd", &embeddings_forward_cpu);
  m.impl("hinge_triplet_loss_emb_bwd", &embeddings_backward_cpu);
}

#ifdef VSE_WITH_CUDA
TORCH_LIBRARY_IMPL(vse_kernels, CUDA, m) {
  m.impl("hinge_triplet_loss_fwd", &forward_cuda);
  m.impl("hinge_triplet_loss_bwd", &backward_cuda);
  m.impl("hinge_triplet_loss_emb_fwd", &embeddings_forward_cuda);
  m.impl("hinge_triplet_loss_emb_bwd", &embeddings_backward_cuda);
}
#endif

}  // namespace vse_kernels::hinge_loss
