// Hinge triplet loss with hard negatives: CUDA kernels (forward and backward).
//
// Deterministic by construction: every output element is written by exactly one thread, reductions run
// in a fixed order with a lowest-index tie-break, and there are no atomics.
#include "hinge_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace vse_kernels::hinge_loss {
namespace {

constexpr int kRowThreads = 256;
constexpr int kColTile = 32;        // columns per block (one warp wide: coalesced row reads)
constexpr int kColLanes = 8;        // rows read in parallel per column
constexpr int kRowsPerChunk = 256;  // rows per block in the column pass; chunks are merged in order

// Running reduction state of one row or column: max with arg (lowest index on ties) or sum with count.
template <typename acc_t>
struct Partial {
  acc_t value;
  int64_t stat;  // arg-max (-1: none) or number of active terms

  __device__ static Partial empty(bool max_violation) {
    return {max_violation ? -std::numeric_limits<acc_t>::infinity() : acc_t(0), max_violation ? -1 : 0};
  }
  __device__ void add(acc_t cost, int64_t index, bool max_violation) {
    if (max_violation) {
      if (cost > value || (cost == value && stat >= 0 && index < stat)) value = cost, stat = index;
    } else if (cost > 0) {
      value += cost, ++stat;
    }
  }
  // Merges a partial covering later indices: the caller keeps the order fixed.
  __device__ void merge(const Partial& other, bool max_violation) {
    if (max_violation) {
      if (other.stat >= 0) add(other.value, other.stat, true);
    } else {
      value += other.value, stat += other.stat;
    }
  }
  __device__ acc_t term(bool max_violation) const {
    return max_violation ? (stat >= 0 && value > 0 ? value : acc_t(0)) : value;
  }
};

template <typename scalar_t, typename acc_t>
__global__ void rows_kernel(const scalar_t* __restrict__ S, const int64_t* __restrict__ ids, int64_t B,
                            acc_t margin, bool max_violation, acc_t* __restrict__ value,
                            int64_t* __restrict__ stat) {
  __shared__ acc_t shared_value[kRowThreads];
  __shared__ int64_t shared_stat[kRowThreads];
  const int64_t i = blockIdx.x;
  const scalar_t* row = S + i * B;
  const acc_t positive = static_cast<acc_t>(row[i]);
  Partial<acc_t> p = Partial<acc_t>::empty(max_violation);
  for (int64_t j = threadIdx.x; j < B; j += kRowThreads) {
    if (is_negative(ids, i, j)) p.add(hinge_cost(margin, static_cast<acc_t>(row[j]), positive), j, max_violation);
  }
  shared_value[threadIdx.x] = p.value, shared_stat[threadIdx.x] = p.stat;
  __syncthreads();
  for (int width = kRowThreads / 2; width > 0; width /= 2) {  // fixed tree: same order every run
    if (threadIdx.x < width) {
      Partial<acc_t> other{shared_value[threadIdx.x + width], shared_stat[threadIdx.x + width]};
      p.merge(other, max_violation);
      shared_value[threadIdx.x] = p.value, shared_stat[threadIdx.x] = p.stat;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) value[i] = p.term(max_violation), stat[i] = p.stat;
}

// Column pass, stage 1: block (x, y) reduces columns [32x, 32x+32) over rows [256y, 256y+256).
template <typename scalar_t, typename acc_t>
__global__ void column_chunks_kernel(const scalar_t* __restrict__ S, const int64_t* __restrict__ ids, int64_t B,
                                     acc_t margin, bool max_violation, acc_t* __restrict__ chunk_value,
                                     int64_t* __restrict__ chunk_stat) {
  __shared__ acc_t shared_value[kColLanes][kColTile];
  __shared__ int64_t shared_stat[kColLanes][kColTile];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kRowsPerChunk;
  const int64_t row_end = min(row_begin + kRowsPerChunk, B);
  Partial<acc_t> p = Partial<acc_t>::empty(max_violation);
  if (j < B) {
    const acc_t positive = static_cast<acc_t>(S[j * B + j]);
    for (int64_t i = row_begin + threadIdx.y; i < row_end; i += kColLanes) {
      if (is_negative(ids, i, j)) p.add(hinge_cost(margin, static_cast<acc_t>(S[i * B + j]), positive), i, max_violation);
    }
  }
  shared_value[threadIdx.y][threadIdx.x] = p.value, shared_stat[threadIdx.y][threadIdx.x] = p.stat;
  __syncthreads();
  if (threadIdx.y == 0 && j < B) {
    for (int lane = 1; lane < kColLanes; ++lane) {
      p.merge(Partial<acc_t>{shared_value[lane][threadIdx.x], shared_stat[lane][threadIdx.x]}, max_violation);
    }
    chunk_value[blockIdx.y * B + j] = p.value, chunk_stat[blockIdx.y * B + j] = p.stat;
  }
}

// Column pass, stage 2: merge the row chunks of each column in order.
template <typename acc_t>
__global__ void column_merge_kernel(const acc_t* __restrict__ chunk_value, const int64_t* __restrict__ chunk_stat,
                                    int64_t B, int64_t chunks, bool max_violation, acc_t* __restrict__ value,
                                    int64_t* __restrict__ stat) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= B) return;
  Partial<acc_t> p{chunk_value[j], chunk_stat[j]};
  for (int64_t c = 1; c < chunks; ++c) p.merge(Partial<acc_t>{chunk_value[c * B + j], chunk_stat[c * B + j]}, max_violation);
  value[j] = p.term(max_violation), stat[j] = p.stat;
}

// Max mode, backward. Launched twice in stream order (rows, then columns): within a launch each thread owns
// one row (or column) of the gradient, so the read-modify-writes never race.
template <typename scalar_t, typename acc_t>
__global__ void sparse_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ S, int64_t B,
                                       acc_t margin, const int64_t* __restrict__ arg, bool columns,
                                       scalar_t* __restrict__ G) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= B || arg[k] < 0) return;
  const int64_t i = columns ? arg[k] : k, j = columns ? k : arg[k];
  const acc_t positive = static_cast<acc_t>(S[k * B + k]);
  if (!(hinge_cost(margin, static_cast<acc_t>(S[i * B + j]), positive) > 0)) return;
  const acc_t g = *grad;
  G[i * B + j] = static_cast<scalar_t>(static_cast<acc_t>(G[i * B + j]) + g);
  G[k * B + k] = static_cast<scalar_t>(static_cast<acc_t>(G[k * B + k]) - g);
}

// Sum mode, backward: dense and elementwise; the diagonal uses the active-term counts saved by the forward.
template <typename scalar_t, typename acc_t>
__global__ void dense_backward_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ S,
                                      const int64_t* __restrict__ ids, int64_t B, acc_t margin,
                                      const int64_t* __restrict__ row_count, const int64_t* __restrict__ col_count,
                                      scalar_t* __restrict__ G) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= B * B) return;
  const int64_t i = n / B, j = n % B;
  const acc_t g = *grad;
  acc_t v = 0;
  if (i == j) {
    v = -g * static_cast<acc_t>(row_count[i] + col_count[i]);
  } else if (is_negative(ids, i, j)) {
    const acc_t s = static_cast<acc_t>(S[n]);
    v = g * static_cast<acc_t>((hinge_cost(margin, s, static_cast<acc_t>(S[i * B + i])) > 0) +
                               (hinge_cost(margin, s, static_cast<acc_t>(S[j * B + j])) > 0));
  }
  G[n] = static_cast<scalar_t>(v);
}

unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& scores_in, double margin,
                                                            bool max_violation,
                                                            const std::optional<at::Tensor>& img_ids) {
  check_inputs(scores_in, img_ids);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor ids = img_ids.has_value() ? img_ids->contiguous() : at::Tensor();
  const int64_t B = scores.size(0);
  at::Tensor row_stat = at::empty({B}, scores.options().dtype(at::kLong));
  at::Tensor col_stat = at::empty({B}, scores.options().dtype(at::kLong));
  if (B == 0) return {at::zeros({}, scores.options()), row_stat, col_stat};
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_options = scores.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const int64_t chunks = (B + kRowsPerChunk - 1) / kRowsPerChunk;
    at::Tensor terms = at::empty({2, B}, acc_options);  // row terms, then column terms
    at::Tensor chunk_value = at::empty({chunks, B}, acc_options);
    at::Tensor chunk_stat = at::empty({chunks, B}, scores.options().dtype(at::kLong));
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    const int64_t* id_ptr = ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr;
    acc_t* row_value = terms.mutable_data_ptr<acc_t>();
    const acc_t m = static_cast<acc_t>(margin);
    auto stream = c10::cuda::getCurrentCUDAStream();

    rows_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
        S, id_ptr, B, m, max_violation, row_value, row_stat.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 chunk_grid(blocks_for(B, kColTile), static_cast<unsigned>(chunks));
    column_chunks_kernel<scalar_t, acc_t><<<chunk_grid, dim3(kColTile, kColLanes), 0, stream>>>(
        S, id_ptr, B, m, max_violation, chunk_value.mutable_data_ptr<acc_t>(),
        chunk_stat.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_merge_kernel<acc_t><<<blocks_for(B, 256), 256, 0, stream>>>(
        chunk_value.const_data_ptr<acc_t>(), chunk_stat.const_data_ptr<int64_t>(), B, chunks, max_violation,
        row_value + B, col_stat.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss = at::sum(terms).to(scores.scalar_type());  // ATen's reduction: fixed order, no atomics
  });
  return {loss, row_stat, col_stat};
}

at::Tensor backward_cuda(const at::Tensor& grad, const at::Tensor& scores_in, double margin, bool max_violation,
                         const std::optional<at::Tensor>& img_ids, const at::Tensor& row_stat_in,
                         const at::Tensor& col_stat_in) {
  check_inputs(scores_in, img_ids);
  check_stats(scores_in, row_stat_in, col_stat_in);
  TORCH_CHECK(grad.numel() == 1, "hinge_triplet_loss_bwd: grad must hold one element, got ", grad.sizes());
  TORCH_CHECK(grad.device() == scores_in.device(), "hinge_triplet_loss_bwd: grad is on ", grad.device(),
              " but scores is on ", scores_in.device());
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor ids = img_ids.has_value() ? img_ids->contiguous() : at::Tensor();
  const at::Tensor row_stat = row_stat_in.contiguous(), col_stat = col_stat_in.contiguous();
  const int64_t B = scores.size(0);
  if (B == 0) return at::zeros({B, B}, scores.options());
  at::Tensor grad_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "hinge_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor g = grad.reshape({}).to(c10::CppTypeToScalarType<acc_t>::value);  // stays on device: no sync
    const acc_t* g_ptr = g.const_data_ptr<acc_t>();
    const scalar_t* S = scores.const_data_ptr<scalar_t>();
    const acc_t m = static_cast<acc_t>(margin);
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (max_violation) {
      grad_scores = at::zeros({B, B}, scores.options());
      scalar_t* G = grad_scores.mutable_data_ptr<scalar_t>();
      for (bool columns : {false, true}) {
        sparse_backward_kernel<scalar_t, acc_t><<<blocks_for(B, 256), 256, 0, stream>>>(
            g_ptr, S, B, m, (columns ? col_stat : row_stat).const_data_ptr<int64_t>(), columns, G);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      grad_scores = at::empty({B, B}, scores.options());
      dense_backward_kernel<scalar_t, acc_t><<<blocks_for(B * B, 256), 256, 0, stream>>>(
          g_ptr, S, ids.defined() ? ids.const_data_ptr<int64_t>() : nullptr, B, m,
          row_stat.const_data_ptr<int64_t>(), col_stat.const_data_ptr<int64_t>(),
          grad_scores.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad_scores;
}

}  // namespace vse_kernels::hinge_loss
