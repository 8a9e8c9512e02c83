// CPU kernels of the dead-zone compander: abs_quantile, and deadzone_forward /
// deadzone_backward over a list of layers, with the group lasso of the
// quantized weights fused in.  Per-element math: codeq/deadzone.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/group_lasso.h"
#include "codeq/ops.h"
#include "cpu/quantile_cpu.h"
#include "cpu/simd.h"

namespace codeq {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;        // elements per parallel task
constexpr int64_t kReduceChunk = 1 << 16;  // fixed chunk of the backward's deterministic sums

template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void forward_loop(const scalar_t* __restrict w, scalar_t* __restrict out, int64_t n, CT s, CT delta,
                                   CT Q) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(dz::forward_element<CT>(static_cast<CT>(w[i]), s, delta, Q));
}

// acc[j] = sum over blk = 0..nblocks-1, in that order, of part[blk * stride + j].
CODEQ_CPU_CLONES void sum_blocks(const double* __restrict part, int64_t stride, int64_t nblocks,
                                 double* __restrict acc, int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const double* p = part + blk * stride;
    for (int64_t j = 0; j < width; ++j) acc[j] += p[j];
  }
}

// The backward's two sums, G_s and G_delta, in kLanes double accumulators:
// element i of a chunk [b, e) goes to lane (i - b) % kLanes, the lanes are
// added in order at the end.  Deterministic, and one AVX-512 register of
// floats per step, which the compiler vectorises.
constexpr int kLanes = 16;

template <typename CT>
struct LaneSums {
  double s[kLanes] = {0};
  double d[kLanes] = {0};
  void add(int j, const dz::BackwardTerms<CT>& t) {
    s[j] += static_cast<double>(t.gs);
    d[j] += static_cast<double>(t.gdelta);
  }
  void finish(double* sum_s, double* sum_d) const {
    double ts = 0, td = 0;
    for (int j = 0; j < kLanes; ++j) {
      ts += s[j];
      td += d[j];
    }
    *sum_s = ts;
    *sum_d = td;
  }
};

// One element of the backward, with the group lasso's gradient w_hat * sc
// added to g when kGL (w_hat recomputed from w, bit for bit the forward's
// value; both the term and the sum rounded to the weight's dtype, as autograd
// rounds the unfused sum).
template <typename scalar_t, typename CT, bool kGL>
__attribute__((always_inline)) inline dz::BackwardTerms<CT> element(scalar_t g, scalar_t w, CT sc, CT s, CT delta,
                                                                   CT Q) {
  const CT wv = static_cast<CT>(w);
  const CT x = dz::scaled_u(wv, s, delta);
  const CT q = dz::level(x, Q);
  CT gg = static_cast<CT>(g);
  if constexpr (kGL) {
    const CT w_hat = static_cast<CT>(static_cast<scalar_t>(dz::dequant(q, s, delta)));
    gg = static_cast<CT>(static_cast<scalar_t>(gg + static_cast<CT>(static_cast<scalar_t>(w_hat * sc))));
  }
  return dz::backward_terms<CT>(gg, wv, x, q, s);
}

// dL/dw over [b, e) of a weight viewed as [rows, cols], and the chunk's two
// sums.  With kGL, scale_ext holds the group lasso's column scales repeated
// past the end (scale_ext[k] = scale[k % cols], cols + kLanes entries), so
// that the kLanes scales of a block starting in column c are scale_ext[c..].
// The lanes, and so the bits of the sums, are the same with and without kGL.
template <typename scalar_t, typename CT, bool kGL>
CODEQ_CPU_CLONES void backward_loop(const scalar_t* __restrict g, const scalar_t* __restrict w,
                                    const CT* __restrict scale_ext, int64_t cols, scalar_t* __restrict out, int64_t b,
                                    int64_t e, CT s, CT delta, CT Q, double* sum_s, double* sum_d) {
  LaneSums<CT> acc;
  int64_t c = kGL ? b % cols : 0;
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    const CT* sc = scale_ext + c;
    for (int j = 0; j < kLanes; ++j) {
      const auto t = element<scalar_t, CT, kGL>(g[i + j], w[i + j], kGL ? sc[j] : CT(0), s, delta, Q);
      out[i + j] = static_cast<scalar_t>(t.grad_w);
      acc.add(j, t);
    }
    if (kGL) c = c + kLanes < cols ? c + kLanes : (c + kLanes) % cols;  // divide only when a row ends
  }
  const CT* sc = scale_ext + c;
  for (int j = 0; i < e; ++i, ++j) {
    const auto t = element<scalar_t, CT, kGL>(g[i], w[i], kGL ? sc[j] : CT(0), s, delta, Q);
    out[i] = static_cast<scalar_t>(t.grad_w);
    acc.add(j, t);
  }
  acc.finish(sum_s, sum_d);
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

// One layer's forward.  With gl_lambda != 0 it also sums the squares of w_hat
// per column while the rows are hot, in the order of group_lasso_forward
// (codeq/group_lasso.h), returns the column norms in *norms and appends the
// layer's lambda-weighted norm sums per column block to *gl_task_sums.
std::tuple<at::Tensor, at::Tensor> forward_layer(const at::Tensor& w, const at::Tensor& logit_dz,
                                                 const at::Tensor& logit_bit, double fixed_bit, double min_bits,
                                                 double max_bits, bool learnable_bit, double gl_lambda,
                                                 at::Tensor* norms, std::vector<double>* gl_task_sums) {
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
      sc = dz::compute_scalars<CT, TH>(a, *logit_dz.const_data_ptr<TH>(), *logit_bit.const_data_ptr<TH>(),
                                       learnable_bit, static_cast<TH>(fixed_bit), static_cast<TH>(min_bits),
                                       static_cast<TH>(max_bits));
    });
    const CT s = sc.s, delta = sc.delta, Q = sc.Q;
    if (gl_lambda == 0.0) {
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        forward_loop<scalar_t, CT>(wp + b, op + b, e - b, s, delta, Q);
      });
    } else {
      // Rows in blocks of gl::row_block(cols): each task quantizes a block and
      // sums its squares per column from zero; the blocks are added in order.
      const int64_t rows = wc.size(0), cols = n / rows;
      const int64_t rb = gl::row_block(cols), nblocks = (rows + rb - 1) / rb, rows_l1 = std::max<int64_t>(1, 4096 / cols);
      std::unique_ptr<double[]> part(new double[static_cast<size_t>(nblocks * cols)]);
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t r0 = blk * rb, r1 = std::min(rows, r0 + rb);
          double* acc = part.get() + blk * cols;
          std::fill(acc, acc + cols, 0.0);
          // a few rows at a time (about 4096 elements): their squares are summed while in L1
          for (int64_t r = r0; r < r1; r += rows_l1) {
            const int64_t re = std::min(r1, r + rows_l1);
            forward_loop<scalar_t, CT>(wp + r * cols, op + r * cols, (re - r) * cols, s, delta, Q);
            for (int64_t k = r; k < re; ++k) gl::add_squares<scalar_t, CT>(op + k * cols, acc, cols);
          }
        }
      });
      // Per column block (one task of group_lasso_forward each): the blocks
      // added in order, the norms, and the block's lambda-weighted norm sum.
      *norms = at::empty({cols}, wc.options().dtype(c10::CppTypeToScalarType<CT>::value));
      CT* np = norms->mutable_data_ptr<CT>();
      const int64_t ncb = (cols + gl::kColBlock - 1) / gl::kColBlock;
      std::vector<double> cb_sums(static_cast<size_t>(ncb));
      at::parallel_for(0, ncb, ncb * nblocks * gl::kColBlock < kGrain ? ncb : 1, [&](int64_t cb0, int64_t cb1) {
        double acc[gl::kColBlock];
        for (int64_t cb = cb0; cb < cb1; ++cb) {
          const int64_t c0 = cb * gl::kColBlock, width = std::min(cols, c0 + gl::kColBlock) - c0;
          sum_blocks(part.get() + c0, cols, nblocks, acc, width);
          cb_sums[cb] = gl::block_norms<CT>(acc, np + c0, width) * gl_lambda;
        }
      });
      gl_task_sums->insert(gl_task_sums->end(), cb_sums.begin(), cb_sums.end());
    }
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

DeadZoneOutputs deadzone_forward_cpu(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit,
                                     at::ArrayRef<double> fixed_bit, at::ArrayRef<double> min_bits,
                                     at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
                                     at::ArrayRef<double> gl_lambda) {
  check_deadzone_lists(w, logit_dz, logit_bit, fixed_bit.size(), min_bits.size(), max_bits.size(),
                       learnable_bit.size(), gl_lambda, "deadzone_forward");
  const size_t n = w.size();
  std::vector<at::Tensor> w_hat(n), scalars(n), norms(n);
  std::vector<at::Tensor> gl_weights;
  std::vector<double> task_sums;
  for (size_t l = 0; l < n; ++l) {
    std::tie(w_hat[l], scalars[l]) = forward_layer(w[l], logit_dz[l], logit_bit[l], fixed_bit[l], min_bits[l],
                                                   max_bits[l], learnable_bit.get(l), gl_lambda[l], &norms[l],
                                                   &task_sums);
    if (gl_lambda[l] == 0.0) norms[l] = at::empty({0}, scalars[l].options());
    else gl_weights.push_back(w[l]);
  }
  double total = 0.0;  // in task order, as group_lasso_forward
  for (double v : task_sums) total += v;
  return {w_hat, at::scalar_tensor(total, w[0].options().dtype(loss_dtype(gl_weights))), scalars, norms};
}

// One layer's backward; with norms != nullptr the group lasso's gradient
// gl_grad * lambda * w_hat / ||w_hat[:, j]|| is added to grad on the way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_layer(const at::Tensor& grad, const at::Tensor& w,
                                                              const at::Tensor& scalars, const at::Tensor& logit_dz,
                                                              const at::Tensor& logit_bit, double min_bits,
                                                              double max_bits, bool learnable_bit,
                                                              const at::Tensor* norms, double gl_grad_lambda) {
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
    const dz::Scalars<CT> sc{sp[dz::kA], sp[dz::kB], sp[dz::kD], sp[dz::kQ], sp[dz::kS], sp[dz::kDelta]};
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* out = grad_w.mutable_data_ptr<scalar_t>();

    // The group lasso's column scales (as group_lasso_backward computes them),
    // repeated past the end for backward_loop.
    const int64_t cols = norms != nullptr && n > 0 ? n / wc.size(0) : 1;
    std::vector<CT> scale_ext;
    if (norms != nullptr) {
      TORCH_CHECK(norms->numel() == cols && norms->scalar_type() == c10::CppTypeToScalarType<CT>::value,
                  "codeq.deadzone_backward: norms do not match w");
      const at::Tensor nc = norms->contiguous();
      const CT* np = nc.const_data_ptr<CT>();
      const CT g_lambda = static_cast<CT>(gl_grad_lambda);
      scale_ext.resize(static_cast<size_t>(cols + kLanes));
      for (int64_t j = 0; j < cols; ++j) scale_ext[j] = gl::column_scale<CT>(g_lambda, np[j]);
      for (int64_t k = cols; k < cols + kLanes; ++k) scale_ext[k] = scale_ext[k % cols];
    }

    // Deterministic sums: fixed chunks, their partial sums added in chunk
    // order -- the same bits for any number of threads.
    const int64_t nchunks = (n + kReduceChunk - 1) / kReduceChunk;
    std::vector<double> part_s(nchunks), part_d(nchunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * kReduceChunk, e = std::min(n, b + kReduceChunk);
        if (norms != nullptr)
          backward_loop<scalar_t, CT, true>(gp, wp, scale_ext.data(), cols, out, b, e, sc.s, sc.delta, sc.Q,
                                            &part_s[c], &part_d[c]);
        else
          backward_loop<scalar_t, CT, false>(gp, wp, nullptr, cols, out, b, e, sc.s, sc.delta, sc.Q, &part_s[c],
                                             &part_d[c]);
      }
    });
    double G_s = 0, G_d = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      G_s += part_s[c];
      G_d += part_d[c];
    }
    AT_DISPATCH_FLOATING_TYPES(logit_dz.scalar_type(), "codeq_deadzone_logit_grads", [&] {
      using TH = scalar_t;
      const auto lg = dz::chain_to_logits<CT, TH>(G_s, G_d, sc, *logit_dz.const_data_ptr<TH>(),
                                                  *logit_bit.const_data_ptr<TH>(), learnable_bit,
                                                  static_cast<TH>(min_bits), static_cast<TH>(max_bits));
      *g_dz.mutable_data_ptr<TH>() = static_cast<TH>(lg.theta_dz);
      *g_bit.mutable_data_ptr<TH>() = static_cast<TH>(lg.theta_bit);
    });
  });
  return {grad_w.view(w.sizes()), g_dz, g_bit};
}

DeadZoneGrads deadzone_backward_cpu(at::TensorList grad, const at::Tensor& gl_grad, at::TensorList w,
                                    at::TensorList w_hat, at::TensorList scalars, at::TensorList norms,
                                    at::TensorList logit_dz, at::TensorList logit_bit, at::ArrayRef<double> min_bits,
                                    at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
                                    at::ArrayRef<double> gl_lambda) {
  check_deadzone_backward_lists(grad, gl_grad, w, w_hat, scalars, norms, logit_dz, logit_bit, min_bits.size(),
                                max_bits.size(), learnable_bit.size(), gl_lambda);
  const size_t n = w.size();
  const bool any_gl = std::any_of(gl_lambda.begin(), gl_lambda.end(), [](double v) { return v != 0.0; });
  const double glg = any_gl ? gl_grad.item<double>() : 0.0;
  std::vector<at::Tensor> gw(n), gdz(n), gbit(n);
  for (size_t l = 0; l < n; ++l) {
    const bool gl = gl_lambda[l] != 0.0;
    // g * lambda rounded to the compute type, as group_lasso_backward forms it
    const double g_lambda = w[l].scalar_type() == at::kDouble
                                ? glg * gl_lambda[l]
                                : static_cast<double>(static_cast<float>(glg) * static_cast<float>(gl_lambda[l]));
    std::tie(gw[l], gdz[l], gbit[l]) = backward_layer(grad[l], w[l], scalars[l], logit_dz[l], logit_bit[l],
                                                      min_bits[l], max_bits[l], learnable_bit.get(l),
                                                      gl ? &norms[l] : nullptr, g_lambda);
  }
  return {gw, gdz, gbit};
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CPU, m) {
  m.impl("abs_quantile", &abs_quantile_cpu);
  m.impl("deadzone_forward", &deadzone_forward_cpu);
  m.impl("deadzone_backward", &deadzone_backward_cpu);
}

}  // namespace cpu
}  // namespace codeq
