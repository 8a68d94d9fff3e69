// Hinge triplet loss with hard negatives: CUDA kernels for the matrix and embedding ops.
//
// Deterministic by construction: every output element is written by exactly one thread per launch,
// reductions run in a fixed order with a lowest-index tie-break, and there are no atomics.
#include "hinge_loss.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace vse_kernels::hinge_loss {
namespace {

constexpr int kRowThreads = 256;
constexpr int kColTile = 32;        // columns per block (one warp wide: coalesced row reads)
constexpr int kColLanes = 8;        // rows read in parallel per column
constexpr int kRowsPerChunk = 256;  // rows per block in the column pass; chunks are merged in order
constexpr int kThreads = 256;

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// One block per row of the tile: the row's term is final after this tile.
template <typename scalar_t, typename acc_t>
__global__ void rows_kernel(Tile<scalar_t, acc_t> t, bool max_violation, acc_t* __restrict__ term,
                            int64_t* __restrict__ stat) {
  __shared__ acc_t shared_value[kRowThreads];
  __shared__ int64_t shared_stat[kRowThreads];
  const int64_t r = blockIdx.x, i = t.row0 + r;
  Reduction<acc_t> row = Reduction<acc_t>::start(max_violation);
  for (int64_t j = threadIdx.x; j < t.batch; j += kRowThreads) {
    if (is_negative(t.ids, i, j)) row.add(hinge_cost(t.margin, t.score(r, j), t.positive[i]), j, max_violation);
  }
  shared_value[threadIdx.x] = row.value, shared_stat[threadIdx.x] = row.stat;
  __syncthreads();
  for (int width = kRowThreads / 2; width > 0; width /= 2) {  // fixed tree: same order every run
    if (threadIdx.x < width) {
      row.merge(Reduction<acc_t>{shared_value[threadIdx.x + width], shared_stat[threadIdx.x + width]}, max_violation);
      shared_value[threadIdx.x] = row.value, shared_stat[threadIdx.x] = row.stat;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) row.finish(max_violation, &term[i], &stat[i]);
}

// Column pass, stage 1: block (x, y) reduces columns [32x, 32x + 32) over tile rows [256y, 256y + 256).
template <typename scalar_t, typename acc_t>
__global__ void column_chunks_kernel(Tile<scalar_t, acc_t> t, bool max_violation, acc_t* __restrict__ chunk_value,
                                     int64_t* __restrict__ chunk_stat) {
  __shared__ acc_t shared_value[kColLanes][kColTile];
  __shared__ int64_t shared_stat[kColLanes][kColTile];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t r_end = min(r_begin + kRowsPerChunk, t.rows);
  Reduction<acc_t> column = Reduction<acc_t>::start(max_violation);
  if (j < t.batch) {
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += kColLanes) {
      const int64_t i = t.row0 + r;
      if (is_negative(t.ids, i, j)) column.add(hinge_cost(t.margin, t.score(r, j), t.positive[j]), i, max_violation);
    }
  }
  shared_value[threadIdx.y][threadIdx.x] = column.value, shared_stat[threadIdx.y][threadIdx.x] = column.stat;
  __syncthreads();
  if (threadIdx.y == 0 && j < t.batch) {
    for (int lane = 1; lane < kColLanes; ++lane) {
      column.merge(Reduction<acc_t>{shared_value[lane][threadIdx.x], shared_stat[lane][threadIdx.x]}, max_violation);
    }
    chunk_value[blockIdx.y * t.batch + j] = column.value, chunk_stat[blockIdx.y * t.batch + j] = column.stat;
  }
}

// Column pass, stage 2: fold this tile's chunks, in order, into the running column reductions.
template <typename acc_t>
__global__ void column_merge_kernel(const acc_t* __restrict__ chunk_value, const int64_t* __restrict__ chunk_stat,
                                    int64_t batch, int64_t chunks, bool max_violation, acc_t* __restrict__ run_value,
                                    int64_t* __restrict__ run_stat) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= batch) return;
  Reduction<acc_t> column{run_value[j], run_stat[j]};
  for (int64_t c = 0; c < chunks; ++c) {
    column.merge(Reduction<acc_t>{chunk_value[c * batch + j], chunk_stat[c * batch + j]}, max_violation);
  }
  run_value[j] = column.value, run_stat[j] = column.stat;
}

template <typename acc_t>
__global__ void finish_columns_kernel(const acc_t* __restrict__ run_value, const int64_t* __restrict__ run_stat,
                                      int64_t batch, bool max_violation, acc_t* __restrict__ term,
                                      int64_t* __restrict__ stat) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < batch) Reduction<acc_t>{run_value[j], run_stat[j]}.finish(max_violation, &term[j], &stat[j]);
}

// The forward over a sequence of tiles (one for the matrix op): rows final per tile, columns carried on.
template <typename scalar_t, typename acc_t>
struct ForwardPass {
  bool max_violation;
  int64_t batch;
  at::Tensor positive, terms, run_value, run_stat, chunk_value, chunk_stat;

  ForwardPass(int64_t batch, int64_t max_rows, bool max_violation, const at::TensorOptions& options)
      : max_violation(max_violation), batch(batch) {
    const auto acc = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t chunks = (max_rows + kRowsPerChunk - 1) / kRowsPerChunk;
    terms = at::empty({2, batch}, acc);  // row terms, then column terms
    run_value = at::full({batch}, Reduction<acc_t>::start(max_violation).value, acc);
    run_stat = at::full({batch}, Reduction<acc_t>::start(max_violation).stat, options.dtype(at::kLong));
    chunk_value = at::empty({chunks, batch}, acc);
    chunk_stat = at::empty({chunks, batch}, options.dtype(at::kLong));
  }

  Tile<scalar_t, acc_t> tile(const at::Tensor& scores, int64_t row0, const at::Tensor& ids, double margin) const {
    return {scores.const_data_ptr<scalar_t>(), scores.size(0), row0, batch, positive.const_data_ptr<acc_t>(),
            ids_ptr(ids), static_cast<acc_t>(margin)};
  }

  void add_tile(const Tile<scalar_t, acc_t>& t, int64_t* row_stat) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    rows_kernel<<<static_cast<unsigned>(t.rows), kRowThreads, 0, stream>>>(
        t, max_violation, terms.mutable_data_ptr<acc_t>(), row_stat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t chunks = (t.rows + kRowsPerChunk - 1) / kRowsPerChunk;
    column_chunks_kernel<<<dim3(blocks_for(batch, kColTile), static_cast<unsigned>(chunks)), dim3(kColTile, kColLanes),
                           0, stream>>>(t, max_violation, chunk_value.mutable_data_ptr<acc_t>(),
                                        chunk_stat.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_merge_kernel<<<blocks_for(batch, kThreads), kThreads, 0, stream>>>(
        chunk_value.const_data_ptr<acc_t>(), chunk_stat.const_data_ptr<int64_t>(), batch, chunks, max_violation,
        run_value.mutable_data_ptr<acc_t>(), run_stat.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor finish(int64_t* col_stat, at::ScalarType dtype) {
    finish_columns_kernel<<<blocks_for(batch, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        run_value.const_data_ptr<acc_t>(), run_stat.const_data_ptr<int64_t>(), batch, max_violation,
        terms.mutable_data_ptr<acc_t>() + batch, col_stat);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return at::sum(terms).to(dtype);  // ATen's reduction: fixed order, no atomics
  }
};

// Max mode, matrix op backward. Launched twice in stream order (rows, then columns): within a launch each
// thread owns one row (or column) of the gradient, so its read-modify-writes never race.
template <typename scalar_t, typename acc_t>
__global__ void sparse_grad_kernel(const acc_t* __restrict__ grad, const int64_t* __restrict__ arg, int64_t batch,
                                   bool columns, scalar_t* __restrict__ G) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= batch || arg[k] < 0) return;
  const int64_t i = columns ? arg[k] : k, j = columns ? k : arg[k];
  const acc_t g = *grad;
  G[i * batch + j] = static_cast<scalar_t>(static_cast<acc_t>(G[i * batch + j]) + g);
  G[k * batch + k] = static_cast<scalar_t>(static_cast<acc_t>(G[k * batch + k]) - g);
}

// Sum mode: d loss / d scores on one tile, elementwise (Tile::dense_grad).
template <typename scalar_t, typename acc_t>
__global__ void dense_grad_kernel(Tile<scalar_t, acc_t> t, const acc_t* __restrict__ grad,
                                  const int64_t* __restrict__ row_count, const int64_t* __restrict__ col_count,
                                  scalar_t* __restrict__ out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= t.rows * t.batch) return;
  out[n] = static_cast<scalar_t>(t.dense_grad(n / t.batch, n % t.batch, *grad, row_count, col_count));
}

// Max mode, embedding op backward, for one side (GatherGrad): block x is one output row k, threads its d.
template <typename scalar_t, typename acc_t>
__global__ void gather_grad_kernel(GatherGrad<scalar_t, acc_t> side, const acc_t* __restrict__ grad,
                                   scalar_t* __restrict__ out) {
  const int64_t k = blockIdx.x, d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d < side.dim) out[k * side.dim + d] = static_cast<scalar_t>(side(k, d, *grad));
}

at::Tensor device_grad(const at::Tensor& grad, at::ScalarType acc) {
  return grad.reshape({}).to(acc).contiguous();  // stays on the device: no host sync
}

}  // namespace

Forward forward_cuda(const at::Tensor& scores_in, double margin, bool max_violation,
                     const std::optional<at::Tensor>& img_ids) {
  check_scores(scores_in, margin, img_ids);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous(), ids = contiguous_ids(img_ids);
  const int64_t B = scores.size(0);
  at::Tensor row_stat = at::empty({B}, scores.options().dtype(at::kLong)), col_stat = at::empty_like(row_stat);
  if (B == 0) return {at::zeros({}, scores.options()), row_stat, col_stat};
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardPass<scalar_t, acc_t> pass(B, B, max_violation, scores.options());
    pass.positive = scores.diagonal().to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    pass.add_tile(pass.tile(scores, 0, ids, margin), row_stat.mutable_data_ptr<int64_t>());
    loss = pass.finish(col_stat.mutable_data_ptr<int64_t>(), scores.scalar_type());
  });
  return {loss, row_stat, col_stat};
}

at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& scores_in, double margin, bool max_violation,
                         const std::optional<at::Tensor>& img_ids, const at::Tensor& row_stat_in,
                         const at::Tensor& col_stat_in) {
  check_scores(scores_in, margin, img_ids);
  check_backward(grad, scores_in.size(0), row_stat_in, col_stat_in, scores_in.device());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous(), ids = contiguous_ids(img_ids);
  const at::Tensor row_stat = row_stat_in.contiguous(), col_stat = col_stat_in.contiguous();
  const int64_t B = scores.size(0);
  if (B == 0) return at::zeros({B, B}, scores.options());
  at::Tensor grad_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor g = device_grad(grad, acc);
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (max_violation) {
      grad_scores = at::zeros({B, B}, scores.options());
      for (bool columns : {false, true}) {
        sparse_grad_kernel<scalar_t, acc_t><<<blocks_for(B, kThreads), kThreads, 0, stream>>>(
            g.const_data_ptr<acc_t>(), (columns ? col_stat : row_stat).const_data_ptr<int64_t>(), B, columns,
            grad_scores.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
    grad_scores = at::empty({B, B}, scores.options());
    const at::Tensor positive = scores.diagonal().to(acc).contiguous();
    const Tile<scalar_t, acc_t> t{scores.const_data_ptr<scalar_t>(), B, 0, B, positive.const_data_ptr<acc_t>(),
                                  ids_ptr(ids), static_cast<acc_t>(margin)};
    dense_grad_kernel<<<blocks_for(B * B, kThreads), kThreads, 0, stream>>>(
        t, g.const_data_ptr<acc_t>(), row_stat.const_data_ptr<int64_t>(), col_stat.const_data_ptr<int64_t>(),
        grad_scores.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_scores;
}

Forward embeddings_forward_cuda(const at::Tensor& img_in, const at::Tensor& txt_in, double margin,
                                bool max_violation, const std::optional<at::Tensor>& img_ids) {
  check_embeddings(img_in, txt_in, margin, img_ids);
  const c10::cuda::CUDAGuard guard(img_in.device());
  const at::Tensor img = img_in.contiguous(), txt = txt_in.contiguous(), ids = contiguous_ids(img_ids);
  const int64_t B = img.size(0), rows = tile_rows(B);
  at::Tensor row_stat = at::empty({B}, img.options().dtype(at::kLong)), col_stat = at::empty_like(row_stat);
  if (B == 0) return {at::zeros({}, img.options()), row_stat, col_stat};
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "hinge_loss_emb_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardPass<scalar_t, acc_t> pass(B, rows, max_violation, img.options());
    pass.positive = positives(img, txt, c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor buffer = at::empty({rows, B}, img.options());  // one tile of scores, reused
    for (int64_t row0 = 0; row0 < B; row0 += rows) {
      const int64_t n = std::min(rows, B - row0);
      at::Tensor scores = buffer.narrow(0, 0, n);
      at::mm_out(scores, img.narrow(0, row0, n), txt.t());
      pass.add_tile(pass.tile(scores, row0, ids, margin), row_stat.mutable_data_ptr<int64_t>());
    }
    loss = pass.finish(col_stat.mutable_data_ptr<int64_t>(), img.scalar_type());
  });
  return {loss, row_stat, col_stat};
}

std::tuple<at::Tensor, at::Tensor> embeddings_backward_cuda(const at::Tensor& grad, const at::Tensor& img_in,
                                                            const at::Tensor& txt_in, double margin,
                                                            bool max_violation,
                                                            const std::optional<at::Tensor>& img_ids,
                                                            const at::Tensor& row_stat_in,
                                                            const at::Tensor& col_stat_in) {
  check_embeddings(img_in, txt_in, margin, img_ids);
  check_backward(grad, img_in.size(0), row_stat_in, col_stat_in, img_in.device());
  const c10::cuda::CUDAGuard guard(img_in.device());
  const at::Tensor img = img_in.contiguous(), txt = txt_in.contiguous(), ids = contiguous_ids(img_ids);
  const at::Tensor row_stat = row_stat_in.contiguous(), col_stat = col_stat_in.contiguous();
  const int64_t B = img.size(0), D = img.size(1);
  at::Tensor grad_img = at::empty({B, D}, img.options()), grad_txt = at::empty({B, D}, img.options());
  if (B == 0 || D == 0) return {grad_img, grad_txt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "hinge_loss_emb_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor g = device_grad(grad, acc);
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (max_violation) {
      const dim3 grid(static_cast<unsigned>(B), blocks_for(D, 128));
      const auto [by_col_stat, col_offsets] = inverse_lists(col_stat);  // columns whose hardest image is k
      const auto [by_row_stat, row_offsets] = inverse_lists(row_stat);  // rows whose hardest caption is k
      const at::Tensor txt_nonfinite = nonfinite_per_column(txt), img_nonfinite = nonfinite_per_column(img);
      const int64_t *rows = row_stat.const_data_ptr<int64_t>(), *cols = col_stat.const_data_ptr<int64_t>();
      gather_grad_kernel<scalar_t, acc_t><<<grid, 128, 0, stream>>>(
          GatherGrad<scalar_t, acc_t>{txt.const_data_ptr<scalar_t>(), rows, cols, by_col_stat.const_data_ptr<int64_t>(),
                                      col_offsets.const_data_ptr<int64_t>(), txt_nonfinite.const_data_ptr<int64_t>(),
                                      D},
          g.const_data_ptr<acc_t>(), grad_img.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gather_grad_kernel<scalar_t, acc_t><<<grid, 128, 0, stream>>>(
          GatherGrad<scalar_t, acc_t>{img.const_data_ptr<scalar_t>(), cols, rows, by_row_stat.const_data_ptr<int64_t>(),
                                      row_offsets.const_data_ptr<int64_t>(), img_nonfinite.const_data_ptr<int64_t>(),
                                      D},
          g.const_data_ptr<acc_t>(), grad_txt.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    // Sum mode: the gradient of the scores is dense; rebuild it tile by tile and multiply through.
    const int64_t rows = tile_rows(B);
    const at::Tensor positive = positives(img, txt, acc);
    at::Tensor scores_buffer = at::empty({rows, B}, img.options()), grad_buffer = at::empty_like(scores_buffer);
    at::Tensor grad_txt_acc = at::zeros({B, D}, img.options().dtype(acc));
    for (int64_t row0 = 0; row0 < B; row0 += rows) {
      const int64_t n = std::min(rows, B - row0);
      const at::Tensor block = img.narrow(0, row0, n);
      at::Tensor scores = scores_buffer.narrow(0, 0, n), grad_scores = grad_buffer.narrow(0, 0, n);
      at::mm_out(scores, block, txt.t());
      const Tile<scalar_t, acc_t> t{scores.const_data_ptr<scalar_t>(), n, row0, B, positive.const_data_ptr<acc_t>(),
                                    ids_ptr(ids), static_cast<acc_t>(margin)};
      dense_grad_kernel<<<blocks_for(n * B, kThreads), kThreads, 0, stream>>>(
          t, g.const_data_ptr<acc_t>(), row_stat.const_data_ptr<int64_t>(), col_stat.const_data_ptr<int64_t>(),
          grad_scores.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor grad_block = grad_img.narrow(0, row0, n);
      at::mm_out(grad_block, grad_scores, txt);
      grad_txt_acc += at::mm(grad_scores.t(), block).to(acc);
    }
    grad_txt.copy_(grad_txt_acc);
  });
  return {grad_img, grad_txt};
}

}  // namespace vse_kernels::hinge_loss
