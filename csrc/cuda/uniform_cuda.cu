// CUDA kernels of the uniform symmetric quantizer (uniform_forward/backward).
// Per-element math: codeq/uniform.h.
//
// forward : a = max|w| as an integer max over the order-preserving keys
//           (select.h; NaN above +Inf like the CPU op; exact, deterministic).
//           n <= kSmallN: ONE single-block kernel (max + quantize).  Larger:
//           cudaMemsetAsync(8 bytes) + a grid max kernel (cub::BlockReduce,
//           one integer atomicMax per block) + the element-wise kernel, which
//           reads the key and writes [a, s].
// backward: one element-wise kernel reading [a, s] on the device.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>

#include "codeq/ops.h"
#include "codeq/select.h"
#include "codeq/uniform.h"
#include "cuda/quantile_cuda.cuh"

namespace codeq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSmallThreads = 512;
constexpr int kUnroll = 4;
constexpr int64_t kMaxBlocks = 1024;

template <typename CT>
__device__ __forceinline__ void atomic_max_key(unsigned long long* p, typename select::KeyTraits<CT>::Key k) {
  atomicMax(p, static_cast<unsigned long long>(k));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads)
    uniform_small_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t n, bool aligned,
                         bool out_aligned, typename AccType<scalar_t>::type Q,
                         typename AccType<scalar_t>::type* __restrict__ scale) {
  using CT = typename AccType<scalar_t>::type;
  using Key = typename select::KeyTraits<CT>::Key;
  using Red = cub::BlockReduce<Key, kSmallThreads>;
  __shared__ typename Red::TempStorage tmp;
  __shared__ Key s_max;
  Key m = 0;
  visit<scalar_t, kUnroll>(w, n, aligned, threadIdx.x, kSmallThreads, [&](CT v) {
    const Key k = select::abs_key<CT>(v);
    if (k > m) m = k;
  });
  const Key bm = Red(tmp).Reduce(m, MaxOp());
  if (threadIdx.x == 0) s_max = bm;
  __syncthreads();
  const CT a = select::key_value<CT>(s_max);
  const CT s = a / Q;
  if (threadIdx.x == 0) {
    scale[0] = a;
    scale[1] = s;
  }
  map_unary<scalar_t>(w, out, n, aligned && out_aligned, threadIdx.x, kSmallThreads,
                      [&](CT v) { return uniform::forward_element<CT>(v, a, s, Q); });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    abs_max_kernel(const scalar_t* __restrict__ w, int64_t n, bool aligned, unsigned long long* __restrict__ gmax) {
  using CT = typename AccType<scalar_t>::type;
  using Key = typename select::KeyTraits<CT>::Key;
  using Red = cub::BlockReduce<Key, kThreads>;
  __shared__ typename Red::TempStorage tmp;
  Key m = 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  visit<scalar_t, kUnroll>(w, n, aligned, tid, nthreads, [&](CT v) {
    const Key k = select::abs_key<CT>(v);
    if (k > m) m = k;
  });
  const Key bm = Red(tmp).Reduce(m, MaxOp());
  if (threadIdx.x == 0 && bm != 0) atomic_max_key<CT>(gmax, bm);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    uniform_quantize_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t n, bool aligned,
                            const unsigned long long* __restrict__ gmax, typename AccType<scalar_t>::type Q,
                            typename AccType<scalar_t>::type* __restrict__ scale) {
  using CT = typename AccType<scalar_t>::type;
  using Key = typename select::KeyTraits<CT>::Key;
  const CT a = select::key_value<CT>(static_cast<Key>(*gmax));
  const CT s = a / Q;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    scale[0] = a;
    scale[1] = s;
  }
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  map_unary<scalar_t>(w, out, n, aligned, tid, nthreads, [&](CT v) { return uniform::forward_element<CT>(v, a, s, Q); });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    uniform_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w,
                            scalar_t* __restrict__ out, int64_t n, bool aligned,
                            const typename AccType<scalar_t>::type* __restrict__ scale,
                            typename AccType<scalar_t>::type Q) {
  using CT = typename AccType<scalar_t>::type;
  const CT a = scale[0], s = scale[1];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  map_binary<scalar_t>(grad, w, out, n, aligned, tid, nthreads,
                       [&](CT g, CT x) { return uniform::backward_element<CT>(g, x, a, s, Q); });
}

std::tuple<at::Tensor, at::Tensor> uniform_forward_cuda(const at::Tensor& w, int64_t bitwidth) {
  check_uniform_inputs(w, bitwidth);
  TORCH_CHECK(w.is_cuda(), "codeq.uniform_forward: w must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.get_device()).stream();
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  at::Tensor out = at::empty_like(wc);
  at::Tensor scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_uniform_forward_cuda", [&] {
    using CT = typename AccType<scalar_t>::type;
    scale = at::empty({2}, wc.options().dtype(c10::CppTypeToScalarType<CT>::value));
    const CT Q = uniform::levels<CT>(bitwidth);
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    CT* sp = scale.mutable_data_ptr<CT>();
    if (n <= kSmallN) {
      uniform_small_kernel<scalar_t><<<1, kSmallThreads, 0, stream>>>(wp, op, n, aligned16(wp), aligned16(op), Q, sp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const at::Tensor ws = zeroed_workspace(8, wc, stream);
    auto* gmax = reinterpret_cast<unsigned long long*>(ws.data_ptr());
    constexpr int V = VecTraits<scalar_t>::kVec;
    const int64_t cap = 4 * static_cast<int64_t>(sm_count(wc.get_device()));
    const int rblocks =
        static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap, ceil_div(n, int64_t(kThreads) * V * kUnroll))));
    abs_max_kernel<scalar_t><<<rblocks, kThreads, 0, stream>>>(wp, n, aligned16(wp), gmax);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int blocks = elementwise_blocks(n, kThreads, V, kMaxBlocks);
    uniform_quantize_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, op, n, aligned16(wp) && aligned16(op),
                                                                       gmax, Q, sp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out.view(w.sizes()), scale};
}

at::Tensor uniform_backward_cuda(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
                                 int64_t bitwidth) {
  check_uniform_backward_inputs(grad, w, scale, bitwidth);
  TORCH_CHECK(w.is_cuda(), "codeq.uniform_backward: w must be a CUDA tensor");
  check_cuda_tensor(grad, w, "uniform_backward", "grad");
  check_cuda_tensor(scale, w, "uniform_backward", "scale");
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.get_device()).stream();
  const at::Tensor wc = w.contiguous(), gc = grad.contiguous(), sc = scale.contiguous();
  const int64_t n = wc.numel();
  at::Tensor out = at::empty_like(wc);
  if (n == 0) return out.view(w.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_uniform_backward_cuda", [&] {
    using CT = typename AccType<scalar_t>::type;
    const CT Q = uniform::levels<CT>(bitwidth);
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int blocks = elementwise_blocks(n, kThreads, VecTraits<scalar_t>::kVec, kMaxBlocks);
    uniform_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        gp, wp, op, n, aligned16(gp) && aligned16(wp) && aligned16(op), sc.const_data_ptr<CT>(), Q);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.view(w.sizes());
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CUDA, m) {
  m.impl("uniform_forward", &uniform_forward_cuda);
  m.impl("uniform_backward", &uniform_backward_cuda);
}

}  // namespace cuda
}  // namespace codeq
