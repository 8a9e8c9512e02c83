// CUDA kernels of the dead-zone compander: deadzone_forward, deadzone_backward
// over a list of layers, one layer after another; the group lasso of the
// quantized weights is group_lasso_forward / group_lasso_backward
// (group_lasso_cuda.cu) over the layers that have a lambda.  Per-element
// math: codeq/deadzone.h (the functions the CPU kernels use).  Per layer:
//
// forward : launch_abs_select (quantile_cuda.cu) finds a = quantile(|w|, 0.99)
//           and writes the scalars on the device; for n <= kSmallN that single
//           launch also quantizes, otherwise one element-wise kernel follows.
// backward: ONE kernel: dL/dw element-wise plus the two reductions G_s, G_delta
//           (per-thread double sums over a fixed, n-only dependent partition,
//           cub::BlockReduce per block, block partials to a workspace); the
//           last block (ticket counter) sums the partials in block order and
//           applies dz::chain_to_logits.  No floating-point atomics: the same
//           bits on every run.
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <tuple>
#include <vector>

#include "codeq/ops.h"
#include "codeq/deadzone.h"
#include "cuda/quantile_cuda.cuh"

namespace codeq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // constant: the reduction partition depends on n only

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dz_quantize_kernel(const scalar_t* __restrict__ w, scalar_t* __restrict__ out, int64_t n, bool aligned,
                       const typename AccType<scalar_t>::type* __restrict__ scalars) {
  using CT = typename AccType<scalar_t>::type;
  const CT s = scalars[dz::kS], delta = scalars[dz::kDelta], Q = scalars[dz::kQ];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  map_unary<scalar_t>(w, out, n, aligned, tid, nthreads, [&](CT v) { return dz::forward_element<CT>(v, s, delta, Q); });
}

template <typename CT, typename TH>
__device__ __forceinline__ void write_logit_grads(double G_s, double G_d, const dz::Scalars<CT>& sc, const DzCfg& cfg,
                                                  void* g_dz, void* g_bit) {
  const dz::LogitGrads lg = dz::chain_to_logits<CT, TH>(
      G_s, G_d, sc, load_logit<TH>(cfg.logit_dz), load_logit<TH>(cfg.logit_bit), cfg.learnable_bit,
      static_cast<TH>(cfg.min_bits), static_cast<TH>(cfg.max_bits));
  *static_cast<TH*>(g_dz) = static_cast<TH>(lg.theta_dz);
  *static_cast<TH*>(g_bit) = static_cast<TH>(lg.theta_bit);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dz_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ w, scalar_t* __restrict__ out,
                       int64_t n, bool aligned, const typename AccType<scalar_t>::type* __restrict__ scalars,
                       double* __restrict__ partials, unsigned int* __restrict__ ticket, DzCfg cfg, void* g_dz,
                       void* g_bit) {
  using CT = typename AccType<scalar_t>::type;
  using Red = cub::BlockReduce<double, kThreads>;
  __shared__ typename Red::TempStorage tmp;
  __shared__ bool s_last;

  const CT s = scalars[dz::kS], delta = scalars[dz::kDelta], Q = scalars[dz::kQ];
  double acc_s = 0.0, acc_d = 0.0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  map_binary<scalar_t>(grad, w, out, n, aligned, tid, nthreads, [&](CT g, CT x) {
    const dz::BackwardTerms<CT> t = dz::backward_element<CT>(g, x, s, delta, Q);
    acc_s += static_cast<double>(t.gs);
    acc_d += static_cast<double>(t.gdelta);
    return t.grad_w;
  });
  const double bs = Red(tmp).Sum(acc_s);
  __syncthreads();
  const double bd = Red(tmp).Sum(acc_d);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = bs;
    partials[2 * blockIdx.x + 1] = bd;
    __threadfence();
    s_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // The last block: partials in block order (thread t sums blocks t, t+256, ...;
  // then a fixed tree): independent of which block came last.
  double ps = 0.0, pd = 0.0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += kThreads) {
    ps += __ldcg(partials + 2 * b);
    pd += __ldcg(partials + 2 * b + 1);
  }
  __syncthreads();
  const double G_s = Red(tmp).Sum(ps);
  __syncthreads();
  const double G_d = Red(tmp).Sum(pd);
  if (threadIdx.x == 0) {
    const dz::Scalars<CT> sc{scalars[dz::kA], scalars[dz::kB], scalars[dz::kD],
                             scalars[dz::kQ], scalars[dz::kS], scalars[dz::kDelta]};
    if (cfg.logits_double)
      write_logit_grads<CT, double>(G_s, G_d, sc, cfg, g_dz, g_bit);
    else
      write_logit_grads<CT, float>(G_s, G_d, sc, cfg, g_dz, g_bit);
  }
}

DzCfg make_cfg(const at::Tensor& logit_dz, const at::Tensor& logit_bit, bool learnable_bit, double fixed_bit,
               double min_bits, double max_bits) {
  DzCfg c;
  c.logit_dz = logit_dz.const_data_ptr();
  c.logit_bit = logit_bit.const_data_ptr();
  c.logits_double = logit_dz.scalar_type() == at::kDouble;
  c.learnable_bit = learnable_bit;
  c.fixed_bit = fixed_bit;
  c.min_bits = min_bits;
  c.max_bits = max_bits;
  return c;
}

std::tuple<at::Tensor, at::Tensor> forward_layer(const at::Tensor& w, const at::Tensor& logit_dz,
                                                 const at::Tensor& logit_bit, double fixed_bit, double min_bits,
                                                 double max_bits, bool learnable_bit) {
  check_deadzone_inputs(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit);
  TORCH_CHECK(w.is_cuda(), "codeq.deadzone_forward: w must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.get_device()).stream();
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  at::Tensor out = at::empty_like(wc);
  at::Tensor scalars;
  const DzCfg cfg = make_cfg(logit_dz, logit_bit, learnable_bit, fixed_bit, min_bits, max_bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_deadzone_forward_cuda", [&] {
    using CT = typename AccType<scalar_t>::type;
    scalars = at::empty({dz::kNumScalars}, wc.options().dtype(c10::CppTypeToScalarType<CT>::value));
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    SelectOut<CT> so;
    so.scalars = scalars.mutable_data_ptr<CT>();
    so.cfg = cfg;
    if (!launch_abs_select<scalar_t>(wp, n, 0.99, so, op, wc, stream)) {
      const int blocks = elementwise_blocks(n, kThreads, VecTraits<scalar_t>::kVec, kMaxBlocks);
      dz_quantize_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(wp, op, n, aligned16(wp) && aligned16(op),
                                                                    so.scalars);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out.view(w.sizes()), scalars};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_layer(const at::Tensor& grad, const at::Tensor& w,
                                                              const at::Tensor& scalars, const at::Tensor& logit_dz,
                                                              const at::Tensor& logit_bit, double min_bits,
                                                              double max_bits, bool learnable_bit) {
  check_deadzone_backward_inputs(grad, w, scalars, logit_dz, logit_bit);
  TORCH_CHECK(w.is_cuda(), "codeq.deadzone_backward: w must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(w.get_device()).stream();
  const at::Tensor wc = w.contiguous();
  const at::Tensor gc = grad.contiguous();
  const at::Tensor sct = scalars.contiguous();
  const int64_t n = wc.numel();
  at::Tensor grad_w = at::empty_like(wc);
  at::Tensor g_dz = at::empty({}, logit_dz.options());
  at::Tensor g_bit = at::empty({}, logit_bit.options());
  TORCH_CHECK(logit_dz.scalar_type() == logit_bit.scalar_type(),
              "codeq.deadzone_backward: logit_dz and logit_bit must have the same dtype");
  // fixed_bit is not used by the backward (B comes from the scalars).
  const DzCfg cfg = make_cfg(logit_dz, logit_bit, learnable_bit, 0.0, min_bits, max_bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_deadzone_backward_cuda", [&] {
    using CT = typename AccType<scalar_t>::type;
    const int blocks = elementwise_blocks(n, kThreads, VecTraits<scalar_t>::kVec, kMaxBlocks);
    // [2 doubles per block | ticket counter]
    const at::Tensor ws = zeroed_workspace(int64_t(blocks) * 2 * 8 + 16, wc, stream);
    auto* partials = reinterpret_cast<double*>(ws.data_ptr());
    auto* ticket = reinterpret_cast<unsigned int*>(partials + 2 * blocks);
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = grad_w.mutable_data_ptr<scalar_t>();
    dz_backward_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        gp, wp, op, n, aligned16(gp) && aligned16(wp) && aligned16(op), sct.const_data_ptr<CT>(), partials, ticket,
        cfg, g_dz.mutable_data_ptr(), g_bit.mutable_data_ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_w.view(w.sizes()), g_dz, g_bit};
}

// The layers that have a group-lasso lambda.
std::vector<size_t> gl_layers(at::ArrayRef<double> gl_lambda) {
  std::vector<size_t> idx;
  for (size_t l = 0; l < gl_lambda.size(); ++l)
    if (gl_lambda[l] != 0.0) idx.push_back(l);
  return idx;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

DeadZoneOutputs deadzone_forward_cuda(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit,
                                      at::ArrayRef<double> fixed_bit, at::ArrayRef<double> min_bits,
                                      at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
                                      at::ArrayRef<double> gl_lambda) {
  check_deadzone_lists(w, logit_dz, logit_bit, fixed_bit.size(), min_bits.size(), max_bits.size(),
                       learnable_bit.size(), gl_lambda, "deadzone_forward");
  using GlFwd = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::ArrayRef<double>);
  static const auto gl_forward = op_handle<GlFwd>("codeq::group_lasso_forward");
  const size_t n = w.size();
  std::vector<at::Tensor> w_hat(n), scalars(n), norms(n);
  for (size_t l = 0; l < n; ++l) {
    std::tie(w_hat[l], scalars[l]) = forward_layer(w[l], logit_dz[l], logit_bit[l], fixed_bit[l], min_bits[l],
                                                   max_bits[l], learnable_bit.get(l));
    norms[l] = at::empty({0}, scalars[l].options());
  }
  const auto idx = gl_layers(gl_lambda);
  if (idx.empty()) return {w_hat, at::zeros({}, w[0].options().dtype(at::kFloat)), scalars, norms};
  std::vector<at::Tensor> sel;
  std::vector<double> lam;
  for (size_t l : idx) {
    sel.push_back(w_hat[l]);
    lam.push_back(gl_lambda[l]);
  }
  auto [gl_loss, sel_norms] = gl_forward.call(sel, lam);
  for (size_t k = 0; k < idx.size(); ++k) norms[idx[k]] = sel_norms[k];
  return {w_hat, gl_loss, scalars, norms};
}

DeadZoneGrads deadzone_backward_cuda(at::TensorList grad, const at::Tensor& gl_grad, at::TensorList w,
                                     at::TensorList w_hat, at::TensorList scalars, at::TensorList norms,
                                     at::TensorList logit_dz, at::TensorList logit_bit, at::ArrayRef<double> min_bits,
                                     at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
                                     at::ArrayRef<double> gl_lambda) {
  check_deadzone_backward_lists(grad, gl_grad, w, w_hat, scalars, norms, logit_dz, logit_bit, min_bits.size(),
                                max_bits.size(), learnable_bit.size(), gl_lambda);
  using GlBwd = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, at::ArrayRef<double>);
  static const auto gl_backward = op_handle<GlBwd>("codeq::group_lasso_backward");
  const size_t n = w.size();
  std::vector<at::Tensor> g(grad.begin(), grad.end());
  const auto idx = gl_layers(gl_lambda);
  if (!idx.empty()) {
    std::vector<at::Tensor> sel, sel_norms;
    std::vector<double> lam;
    for (size_t l : idx) {
      sel.push_back(w_hat[l]);
      sel_norms.push_back(norms[l]);
      lam.push_back(gl_lambda[l]);
    }
    const auto gl_g = gl_backward.call(gl_grad, sel, sel_norms, lam);
    for (size_t k = 0; k < idx.size(); ++k) g[idx[k]] = at::add(g[idx[k]], gl_g[k]);
  }
  std::vector<at::Tensor> gw(n), gdz(n), gbit(n);
  for (size_t l = 0; l < n; ++l) {
    std::tie(gw[l], gdz[l], gbit[l]) = backward_layer(g[l].contiguous(), w[l], scalars[l], logit_dz[l], logit_bit[l],
                                                      min_bits[l], max_bits[l], learnable_bit.get(l));
  }
  return {gw, gdz, gbit};
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CUDA, m) {
  m.impl("deadzone_forward", &deadzone_forward_cuda);
  m.impl("deadzone_backward", &deadzone_backward_cuda);
}

}  // namespace cuda
}  // namespace codeq
