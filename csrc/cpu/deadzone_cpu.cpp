// CPU kernels of the dead-zone compander: abs_quantile, deadzone_forward,
// deadzone_backward.  Per-element math lives in codeq/deadzone.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/checks.h"
#include "cpu/quantile_cpu.h"
#include "cpu/simd.h"

namespace codeq {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;        // elements per parallel task
constexpr int64_t kReduceChunk = 1 << 16;  // fixed chunk of the deterministic sums

// The hot loops, one function each so that they get AVX2/AVX-512 clones.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void forward_loop(const scalar_t* __restrict w, scalar_t* __restrict out, int64_t b, int64_t e,
                                   CT s, CT delta, CT Q) {
  for (int64_t i = b; i < e; ++i) {
    out[i] = static_cast<scalar_t>(dz::forward_element<CT>(static_cast<CT>(w[i]), s, delta, Q));
  }
}

// dL/dw over [b, e) and the chunk's two sums (8 independent lanes of double
// accumulators, summed in a fixed order: deterministic).
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void backward_loop(const scalar_t* __restrict g, const scalar_t* __restrict w,
                                    scalar_t* __restrict out, int64_t b, int64_t e, CT s, CT delta, CT Q,
                                    double* sum_s, double* sum_d) {
  constexpr int L = 8;
  double acc_s[L] = {0}, acc_d[L] = {0};
  int64_t i = b;
  for (; i + L <= e; i += L) {
    for (int j = 0; j < L; ++j) {
      const auto t = dz::backward_element<CT>(static_cast<CT>(g[i + j]), static_cast<CT>(w[i + j]), s, delta, Q);
      out[i + j] = static_cast<scalar_t>(t.grad_w);
      acc_s[j] += static_cast<double>(t.gs);
      acc_d[j] += static_cast<double>(t.gdelta);
    }
  }
  for (int j = 0; i < e; ++i, ++j) {
    const auto t = dz::backward_element<CT>(static_cast<CT>(g[i]), static_cast<CT>(w[i]), s, delta, Q);
    out[i] = static_cast<scalar_t>(t.grad_w);
    acc_s[j] += static_cast<double>(t.gs);
    acc_d[j] += static_cast<double>(t.gdelta);
  }
  double ts = 0, td = 0;
  for (int j = 0; j < L; ++j) {
    ts += acc_s[j];
    td += acc_d[j];
  }
  *sum_s = ts;
  *sum_d = td;
}

at::Tensor abs_quantile_cpu(const at::Tensor& x, double q) {
  check_float_tensor(x, "abs_quantile", "x");
  TORCH_CHECK(x.numel() > 0, "codeq.abs_quantile: got an empty tensor");
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "codeq.abs_quantile: q must lie in [0, 1], got ", q);
  const at::Tensor xc = x.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "codeq_abs_quantile", [&] {
    using CT = typename AccType<scalar_t>::type;
    const CT a = abs_quantile<scalar_t>(xc.const_data_ptr<scalar_t>(), xc.numel(), q);
    out = at::scalar_tensor(a, xc.options().dtype(c10::CppTypeToScalarType<CT>::value));
  });
  return out;
}

template <typename TH>
TH logit_value(const at::Tensor& t) {
  return t.item<TH>();
}

std::tuple<at::Tensor, at::Tensor> deadzone_forward_cpu(const at::Tensor& w, const at::Tensor& logit_dz,
                                                        const at::Tensor& logit_bit, double fixed_bit,
                                                        double min_bits, double max_bits, bool learnable_bit) {
  check_deadzone_inputs(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit);
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  at::Tensor out = at::empty_like(wc);
  at::Tensor scalars;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_deadzone_forward", [&] {
    using CT = typename AccType<scalar_t>::type;
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const CT a = abs_quantile<scalar_t>(wp, n, 0.99);
    dz::Scalars<CT> sc;
    AT_DISPATCH_FLOATING_TYPES(logit_dz.scalar_type(), "codeq_deadzone_logits", [&] {
      using TH = scalar_t;
      sc = dz::compute_scalars<CT, TH>(a, logit_value<TH>(logit_dz), logit_value<TH>(logit_bit), learnable_bit,
                                       static_cast<TH>(fixed_bit), static_cast<TH>(min_bits),
                                       static_cast<TH>(max_bits));
    });
    const CT s = sc.s, delta = sc.delta, Q = sc.Q;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { forward_loop<scalar_t, CT>(wp, op, b, e, s, delta, Q); });
    scalars = at::empty({dz::kNumScalars}, wc.options().dtype(c10::CppTypeToScalarType<CT>::value));
    CT* sp = scalars.mutable_data_ptr<CT>();
    sp[dz::kA] = sc.a;
    sp[dz::kB] = sc.B;
    sp[dz::kD] = sc.d;
    sp[dz::kQ] = sc.Q;
    sp[dz::kS] = sc.s;
    sp[dz::kDelta] = sc.delta;
  });
  return {out.view(w.sizes()), scalars};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deadzone_backward_cpu(const at::Tensor& grad, const at::Tensor& w,
                                                                     const at::Tensor& scalars,
                                                                     const at::Tensor& logit_dz,
                                                                     const at::Tensor& logit_bit, double min_bits,
                                                                     double max_bits, bool learnable_bit) {
  check_deadzone_backward_inputs(grad, w, scalars, logit_dz, logit_bit);
  const at::Tensor wc = w.contiguous();
  const at::Tensor gc = grad.contiguous();
  const int64_t n = wc.numel();
  at::Tensor grad_w = at::empty_like(wc);
  at::Tensor g_dz = at::empty({}, logit_dz.options());
  at::Tensor g_bit = at::empty({}, logit_bit.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_deadzone_backward", [&] {
    using CT = typename AccType<scalar_t>::type;
    const at::Tensor sct = scalars.contiguous();
    const CT* sp = sct.const_data_ptr<CT>();
    dz::Scalars<CT> sc{sp[dz::kA], sp[dz::kB], sp[dz::kD], sp[dz::kQ], sp[dz::kS], sp[dz::kDelta]};
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* out = grad_w.mutable_data_ptr<scalar_t>();
    const CT s = sc.s, delta = sc.delta, Q = sc.Q;

    // Deterministic reductions: fixed chunks, partial sums in double, summed
    // in chunk order -- the same bits for any number of threads.
    const int64_t nchunks = (n + kReduceChunk - 1) / kReduceChunk;
    std::vector<double> part_s(nchunks), part_d(nchunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * kReduceChunk, e = std::min(n, b + kReduceChunk);
        backward_loop<scalar_t, CT>(gp, wp, out, b, e, s, delta, Q, &part_s[c], &part_d[c]);
      }
    });
    double G_s = 0, G_d = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      G_s += part_s[c];
      G_d += part_d[c];
    }
    AT_DISPATCH_FLOATING_TYPES(logit_dz.scalar_type(), "codeq_deadzone_logit_grads", [&] {
      using TH = scalar_t;
      const auto lg = dz::chain_to_logits<CT, TH>(G_s, G_d, sc, logit_value<TH>(logit_dz),
                                                  logit_value<TH>(logit_bit), learnable_bit,
                                                  static_cast<TH>(min_bits), static_cast<TH>(max_bits));
      g_dz.fill_(lg.theta_dz);
      g_bit.fill_(lg.theta_bit);
    });
  });
  return {grad_w.view(w.sizes()), g_dz, g_bit};
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CPU, m) {
  m.impl("abs_quantile", &abs_quantile_cpu);
  m.impl("deadzone_forward", &deadzone_forward_cpu);
  m.impl("deadzone_backward", &deadzone_backward_cpu);
}

}  // namespace cpu
}  // namespace codeq
