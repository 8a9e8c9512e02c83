// CUDA kernels of the multi-tensor group lasso (group_lasso_forward/backward):
// every layer of a model in one launch per pass.
//
// Layout: layer l is W_l.reshape(rows, cols) (contiguous); its columns are cut
// into tiles of 32 (one column per lane); a tile is one block of 8 warps that
// split the rows (warp k takes rows k, k+8, ...).  Reads are coalesced along a
// row (32 consecutive columns per warp).
//
// The per-layer pointers/shapes/lambdas travel as a __grid_constant__ kernel
// argument (up to kMaxLayers layers per launch; more layers -> more launches),
// so no host->device copy and no synchronisation.
//
// forward : one launch: column norms (double sums over the rows, fixed order)
//           -> norms[l] in the compute dtype; per tile lambda_l * sum of its
//           norms (double) -> a partial per tile; then one single-block kernel
//           sums the partials in tile order (deterministic) into the loss.
// backward: one launch: dW = W * ((g * lambda) / norm), 0 for a zero column
//           (gl::column_scale, the CPU's formula); g is read on the device.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>
#include <vector>

#include "codeq/ops.h"
#include "codeq/group_lasso.h"
#include "cuda/cuda_utils.cuh"

namespace codeq {
namespace cuda {
namespace {

constexpr int kCols = 32;   // columns per tile
constexpr int kWarps = 8;   // warps per tile
constexpr int kThreads = kCols * kWarps;
constexpr int kRowUnroll = 4;
constexpr int kMaxLayers = 56;  // 56 * 56 B + header < 4 KiB of kernel arguments
constexpr int kLossThreads = 256;

struct GlLayer {
  const void* w;     // [rows, cols] contiguous, storage dtype of the batch
  void* norms;       // [cols] compute dtype (forward: written, backward: read)
  void* out;         // backward: dW (storage dtype)
  int64_t rows, cols;
  double lambda;
  int64_t tile_begin;  // first tile of this layer within the launch
};

struct GlBatch {
  int count;
  int64_t tiles;           // tiles of this launch (= gridDim.x)
  int64_t partial_offset;  // forward: index of this launch's first tile partial
  const void* grad;        // backward: the 0-dim incoming gradient (float or double)
  bool grad_double;
  GlLayer layer[kMaxLayers];
};
static_assert(sizeof(GlBatch) <= 4000, "GlBatch must fit in the 4 KiB kernel-argument space");

__device__ __forceinline__ int find_layer(const GlBatch& b, int64_t tile) {
  int l = 0;
  for (int i = 1; i < b.count; ++i)
    if (tile >= b.layer[i].tile_begin) l = i;
  return l;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gl_forward_kernel(const __grid_constant__ GlBatch batch,
                                                              double* __restrict__ partials) {
  using CT = typename AccType<scalar_t>::type;
  __shared__ double part[kWarps][kCols];
  const int64_t tile = blockIdx.x;
  const GlLayer& L = batch.layer[find_layer(batch, tile)];
  const int lane = threadIdx.x % kCols, warp = threadIdx.x / kCols;
  const int64_t col = (tile - L.tile_begin) * kCols + lane;
  const bool valid = col < L.cols;
  const scalar_t* __restrict__ w = static_cast<const scalar_t*>(L.w);
  const int64_t rows = L.rows, cols = L.cols;
  double acc = 0.0;
  if (valid) {
    int64_t r = warp;
    for (; r + (kRowUnroll - 1) * kWarps < rows; r += kRowUnroll * kWarps) {
      CT v[kRowUnroll];
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) v[u] = static_cast<CT>(w[(r + u * kWarps) * cols + col]);
#pragma unroll
      for (int u = 0; u < kRowUnroll; ++u) {
        const double d = static_cast<double>(v[u]);
        acc += d * d;
      }
    }
    for (; r < rows; r += kWarps) {
      const double d = static_cast<double>(static_cast<CT>(w[r * cols + col]));
      acc += d * d;
    }
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0) {
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) ss += part[k][lane];
    double term = 0.0;
    if (valid) {
      const CT nrm = static_cast<CT>(sqrt(ss));
      static_cast<CT*>(L.norms)[col] = nrm;
      term = static_cast<double>(nrm);
    }
    // Fixed butterfly: the same sum on every run.
#pragma unroll
    for (int off = kCols / 2; off > 0; off /= 2) term += __shfl_xor_sync(0xffffffffu, term, off);
    if (lane == 0) partials[batch.partial_offset + tile] = term * L.lambda;
  }
}

__global__ void __launch_bounds__(kLossThreads)
    gl_loss_kernel(const double* __restrict__ partials, int64_t count, void* loss, bool loss_double) {
  using Red = cub::BlockReduce<double, kLossThreads>;
  __shared__ typename Red::TempStorage tmp;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kLossThreads) acc += partials[i];
  const double total = Red(tmp).Sum(acc);
  if (threadIdx.x == 0) {
    if (loss_double)
      *static_cast<double*>(loss) = total;
    else
      *static_cast<float*>(loss) = static_cast<float>(total);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gl_backward_kernel(const __grid_constant__ GlBatch batch) {
  using CT = typename AccType<scalar_t>::type;
  const int64_t tile = blockIdx.x;
  const GlLayer& L = batch.layer[find_layer(batch, tile)];
  const int lane = threadIdx.x % kCols, warp = threadIdx.x / kCols;
  const int64_t col = (tile - L.tile_begin) * kCols + lane;
  if (col >= L.cols) return;  // no block-level synchronisation below
  const double g = batch.grad_double ? *static_cast<const double*>(batch.grad)
                                     : static_cast<double>(*static_cast<const float*>(batch.grad));
  const CT g_lambda = static_cast<CT>(static_cast<CT>(g) * static_cast<CT>(L.lambda));
  const CT scale = gl::column_scale<CT>(g_lambda, static_cast<const CT*>(L.norms)[col]);
  const scalar_t* __restrict__ w = static_cast<const scalar_t*>(L.w);
  scalar_t* __restrict__ o = static_cast<scalar_t*>(L.out);
  const int64_t rows = L.rows, cols = L.cols;
  for (int64_t r = warp; r < rows; r += kWarps) {
    const int64_t i = r * cols + col;
    o[i] = static_cast<scalar_t>(mul_rn(static_cast<CT>(w[i]), scale));
  }
}

// ------------------------------------------------------------------- host --
void check_layers(at::TensorList weights, at::ArrayRef<double> lambdas, const char* op) {
  check_group_lasso_layers(weights, lambdas, op);
  TORCH_CHECK(!weights.empty(), "codeq.", op, ": got no weights");
  TORCH_CHECK(weights[0].is_cuda(), "codeq.", op, ": the weights are not CUDA tensors");
}

int64_t cols_of(const at::Tensor& w) { return w.size(0) == 0 ? 0 : w.numel() / w.size(0); }

// Groups the layers into launches: per storage dtype (in order of first
// appearance), at most kMaxLayers layers each, skipping layers without
// columns.  fill(batch, layer index, slot) sets the pointers of a slot.
template <typename Fill, typename Launch>
void for_each_batch(const std::vector<at::Tensor>& ws, at::ArrayRef<double> lambdas, Fill fill, Launch launch) {
  std::vector<at::ScalarType> dtypes;
  for (const auto& w : ws)
    if (std::find(dtypes.begin(), dtypes.end(), w.scalar_type()) == dtypes.end()) dtypes.push_back(w.scalar_type());
  for (const auto dt : dtypes) {
    GlBatch b{};
    auto flush = [&]() {
      if (b.count > 0) launch(dt, b);
      b = GlBatch{};
    };
    for (size_t l = 0; l < ws.size(); ++l) {
      const at::Tensor& w = ws[l];
      if (w.scalar_type() != dt) continue;
      const int64_t cols = cols_of(w), rows = w.size(0);
      if (cols == 0 || rows == 0) continue;
      if (b.count == kMaxLayers) flush();
      GlLayer& L = b.layer[b.count];
      L.w = w.const_data_ptr();
      L.rows = rows;
      L.cols = cols;
      L.lambda = lambdas[l];
      L.tile_begin = b.tiles;
      fill(L, l);
      b.tiles += ceil_div(cols, kCols);
      b.count++;
    }
    flush();
  }
}

std::tuple<at::Tensor, std::vector<at::Tensor>> group_lasso_forward_cuda(at::TensorList weights,
                                                                        at::ArrayRef<double> lambdas) {
  check_layers(weights, lambdas, "group_lasso_forward");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weights[0].get_device()).stream();
  std::vector<at::Tensor> ws, norms;
  int64_t total_tiles = 0;
  for (const auto& w : weights) {
    ws.push_back(w.contiguous());
    const auto ct = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    norms.push_back(at::empty({cols_of(w)}, w.options().dtype(ct)));
    if (w.size(0) > 0) total_tiles += ceil_div(cols_of(w), kCols);
  }
  const at::Tensor partials = at::empty({std::max<int64_t>(total_tiles, 1)}, ws[0].options().dtype(at::kDouble));
  double* pp = partials.mutable_data_ptr<double>();
  int64_t offset = 0;
  for_each_batch(
      ws, lambdas, [&](GlLayer& L, size_t l) { L.norms = norms[l].mutable_data_ptr(); },
      [&](at::ScalarType dt, GlBatch& b) {
        b.partial_offset = offset;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "codeq_gl_forward_cuda", [&] {
          gl_forward_kernel<scalar_t><<<static_cast<unsigned int>(b.tiles), kThreads, 0, stream>>>(b, pp);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        offset += b.tiles;
      });
  const auto dt = loss_dtype(weights);
  at::Tensor loss = at::empty({}, ws[0].options().dtype(dt));
  gl_loss_kernel<<<1, kLossThreads, 0, stream>>>(pp, offset, loss.mutable_data_ptr(), dt == at::kDouble);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, norms};
}

std::vector<at::Tensor> group_lasso_backward_cuda(const at::Tensor& grad, at::TensorList weights,
                                                  at::TensorList norms, at::ArrayRef<double> lambdas) {
  check_layers(weights, lambdas, "group_lasso_backward");
  TORCH_CHECK(norms.size() == weights.size(), "codeq.group_lasso_backward: got ", norms.size(), " norms for ",
              weights.size(), " weights");
  TORCH_CHECK(grad.numel() == 1, "codeq.group_lasso_backward: grad must be a one-element tensor");
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weights[0].get_device()).stream();
  // The incoming gradient, read on the device (float32 or float64).
  at::Tensor g = grad.reshape({});
  if (g.device() != weights[0].device() || (g.scalar_type() != at::kFloat && g.scalar_type() != at::kDouble))
    g = g.to(weights[0].device(), g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  g = g.contiguous();
  std::vector<at::Tensor> ws, ns, outs;
  for (size_t l = 0; l < weights.size(); ++l) {
    ws.push_back(weights[l].contiguous());
    ns.push_back(norms[l].contiguous());
    const auto ct = weights[l].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(ns[l].numel() * std::max<int64_t>(weights[l].size(0), 1) == weights[l].numel() ||
                    weights[l].numel() == 0,
                "codeq.group_lasso_backward: norms[", l, "] does not match weights[", l, "]");
    TORCH_CHECK(ns[l].scalar_type() == ct && ns[l].device() == weights[0].device(), "codeq.group_lasso_backward: norms[",
                l, "] must be the ", ct, " tensor returned by group_lasso_forward");
    outs.push_back(at::empty_like(ws[l]));
  }
  for_each_batch(
      ws, lambdas,
      [&](GlLayer& L, size_t l) {
        L.norms = const_cast<void*>(ns[l].const_data_ptr());
        L.out = outs[l].mutable_data_ptr();
      },
      [&](at::ScalarType dt, GlBatch& b) {
        b.grad = g.const_data_ptr();
        b.grad_double = g.scalar_type() == at::kDouble;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "codeq_gl_backward_cuda", [&] {
          gl_backward_kernel<scalar_t><<<static_cast<unsigned int>(b.tiles), kThreads, 0, stream>>>(b);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CUDA, m) {
  m.impl("group_lasso_forward", &group_lasso_forward_cuda);
  m.impl("group_lasso_backward", &group_lasso_backward_cuda);
}

}  // namespace cuda
}  // namespace codeq
