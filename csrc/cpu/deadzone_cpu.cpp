// CPU kernels of the dead-zone compander: abs_quantile, deadzone_forward,
// deadzone_backward.  Per-element math lives in codeq/deadzone.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <tuple>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/checks.h"
#include "codeq/group_lasso.h"
#include "codeq/multi.h"
#include "cpu/quantile_cpu.h"
#include "cpu/scratch.h"
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

// Rows [0, nrows) of a [*, cols] weight through forward_loop as one
// contiguous range (short rows would each end in a scalar tail), then each
// row's squares added to acc[0..cols) in row order (the group-lasso column
// sums; codeq/group_lasso.h).
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void forward_rows_squares(const scalar_t* __restrict w, scalar_t* __restrict out,
                                           double* __restrict acc, int64_t nrows, int64_t cols, CT s, CT delta,
                                           CT Q) {
  const int64_t n = nrows * cols;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<scalar_t>(dz::forward_element<CT>(static_cast<CT>(w[i]), s, delta, Q));
  }
  for (int64_t r = 0; r < nrows; ++r) gl::add_squares<scalar_t, CT>(out + r * cols, acc, cols);
}

// Rows per forward_rows_squares call: about 4096 elements (the rows stay in
// L1 for their squares), at least one row.
inline int64_t rows_per_group(int64_t cols) { return cols >= 4096 ? 1 : 4096 / cols; }

// acc[0..width) = the sum over blk = 0..nblocks-1, in that order, of
// part[blk * stride + j] (the fused forward's group-lasso column sums).
CODEQ_CPU_CLONES void sum_blocks(const double* __restrict part, int64_t stride, int64_t nblocks,
                                 double* __restrict acc, int64_t width) {
  for (int64_t j = 0; j < width; ++j) acc[j] = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const double* p = part + blk * stride;
    for (int64_t j = 0; j < width; ++j) acc[j] += p[j];
  }
}

// The backward's reductions G_s and G_delta: kLanes independent double
// accumulators, element i of a chunk [b, e) going to lane (i - b) % kLanes, in
// increasing i, the lanes summed in order at the end (deterministic, and the
// same bits for every loop below).  16 lanes: one AVX-512 register of floats
// per step (and two of doubles), which the compiler vectorises.
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

// dL/dw over [b, e) and the chunk's two sums.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void backward_loop(const scalar_t* __restrict g, const scalar_t* __restrict w,
                                    scalar_t* __restrict out, int64_t b, int64_t e, CT s, CT delta, CT Q,
                                    double* sum_s, double* sum_d) {
  LaneSums<CT> acc;
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const auto t = dz::backward_element<CT>(static_cast<CT>(g[i + j]), static_cast<CT>(w[i + j]), s, delta, Q);
      out[i + j] = static_cast<scalar_t>(t.grad_w);
      acc.add(j, t);
    }
  }
  for (int j = 0; i < e; ++i, ++j) {
    const auto t = dz::backward_element<CT>(static_cast<CT>(g[i]), static_cast<CT>(w[i]), s, delta, Q);
    out[i] = static_cast<scalar_t>(t.grad_w);
    acc.add(j, t);
  }
  acc.finish(sum_s, sum_d);
}

// One element of backward_loop with the group-lasso gradient added to g in
// registers: g' = g + w_hat * sc, w_hat recomputed from w (bit for bit the
// forward's value), rounded as autograd rounds the unfused sum (the
// group-lasso gradient in the weight's dtype, then the sum in the weight's
// dtype).  The same bits as backward_element on the materialised g'.
template <typename scalar_t, typename CT>
__attribute__((always_inline)) inline dz::BackwardTerms<CT> gl_element(scalar_t g, scalar_t w, CT sc, CT s, CT delta,
                                                                      CT Q) {
  const CT wv = static_cast<CT>(w);
  const CT x = dz::scaled_u(wv, s, delta);
  const CT q = dz::level(x, Q);
  const CT w_hat = static_cast<CT>(static_cast<scalar_t>(dz::dequant(q, s, delta)));
  const scalar_t gl = static_cast<scalar_t>(w_hat * sc);
  const CT gg = static_cast<CT>(static_cast<scalar_t>(static_cast<CT>(g) + static_cast<CT>(gl)));
  return dz::backward_terms<CT>(gg, wv, x, q, s);
}

// backward_loop with the group-lasso gradient fused in (scale[col] per column
// of the [rows, cols] view).  Walks [b, e) row segment by row segment: whole
// blocks of kLanes inside a segment take the vector loop, the elements before
// and after them the scalar one, each into lane (i - b) % kLanes -- the
// lanes and order of backward_loop, so the sums have its bits.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void backward_loop_gl(const scalar_t* __restrict g, const scalar_t* __restrict w,
                                       const CT* __restrict scale, int64_t cols, scalar_t* __restrict out,
                                       int64_t b, int64_t e, CT s, CT delta, CT Q, double* sum_s, double* sum_d) {
  LaneSums<CT> acc;
  int64_t i = b;
  while (i < e) {
    const int64_t row0 = i - i % cols;  // index of column 0 of this row
    const int64_t seg_end = std::min(e, row0 + cols);
    const CT* sc = scale - row0;  // sc[i] is element i's column scale inside this row
    for (; i < seg_end && (i - b) % kLanes != 0; ++i) {
      const auto t = gl_element<scalar_t, CT>(g[i], w[i], sc[i], s, delta, Q);
      out[i] = static_cast<scalar_t>(t.grad_w);
      acc.add(static_cast<int>((i - b) % kLanes), t);
    }
    for (; i + kLanes <= seg_end; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const auto t = gl_element<scalar_t, CT>(g[i + j], w[i + j], sc[i + j], s, delta, Q);
        out[i + j] = static_cast<scalar_t>(t.grad_w);
        acc.add(j, t);
      }
    }
    for (; i < seg_end; ++i) {
      const auto t = gl_element<scalar_t, CT>(g[i], w[i], sc[i], s, delta, Q);
      out[i] = static_cast<scalar_t>(t.grad_w);
      acc.add(static_cast<int>((i - b) % kLanes), t);
    }
  }
  acc.finish(sum_s, sum_d);
}

// backward_loop_gl for rows whose length is not a multiple of kLanes (each
// row would end in a scalar tail): the column scales expanded to one per
// element of [b, e) (sc[i - b]), one flat loop, the lanes and order of
// backward_loop -- the same bits.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void backward_loop_gl_flat(const scalar_t* __restrict g, const scalar_t* __restrict w,
                                            const CT* __restrict sc, scalar_t* __restrict out, int64_t b, int64_t e,
                                            CT s, CT delta, CT Q, double* sum_s, double* sum_d) {
  LaneSums<CT> acc;
  int64_t i = b;
  for (; i + kLanes <= e; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const auto t = gl_element<scalar_t, CT>(g[i + j], w[i + j], sc[i + j - b], s, delta, Q);
      out[i + j] = static_cast<scalar_t>(t.grad_w);
      acc.add(j, t);
    }
  }
  for (int j = 0; i < e; ++i, ++j) {
    const auto t = gl_element<scalar_t, CT>(g[i], w[i], sc[i - b], s, delta, Q);
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

// A logit's value: read in place (no dispatched item() call, ~1 us each, 2
// per layer per pass) when it is a CPU tensor of the type asked for.
template <typename TH>
TH logit_value(const at::Tensor& t) {
  if (t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == c10::CppTypeToScalarType<TH>::value)
    return *t.const_data_ptr<TH>();
  return t.item<TH>();
}

// A one-element tensor of dtype TH set to v (as fill_(v) would: v cast to
// TH), written in place on the CPU (no dispatched fill_, ~1 us each).
template <typename TH>
void set_value(at::Tensor& t, double v) {
  if (t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == c10::CppTypeToScalarType<TH>::value &&
      t.is_contiguous())
    *t.mutable_data_ptr<TH>() = static_cast<TH>(v);
  else
    t.fill_(v);
}

// A one-element float or double tensor's value as a double (item() without
// the dispatch, on the CPU).
double double_value(const at::Tensor& t) {
  if (t.device().is_cpu() && t.numel() == 1) {
    if (t.scalar_type() == at::kFloat) return static_cast<double>(*t.const_data_ptr<float>());
    if (t.scalar_type() == at::kDouble) return *t.const_data_ptr<double>();
  }
  return t.item<double>();
}

// One layer's forward; with gl_lambda != 0 it also computes the column norms
// of w_hat (returned in *norms) while the rows are hot, in the summation order
// of group_lasso_forward (codeq/group_lasso.h), and appends the layer's
// lambda-weighted norm sums per column block to *gl_task_sums.
std::tuple<at::Tensor, at::Tensor> deadzone_forward_impl(const at::Tensor& w, const at::Tensor& logit_dz,
                                                         const at::Tensor& logit_bit, double fixed_bit,
                                                         double min_bits, double max_bits, bool learnable_bit,
                                                         double gl_lambda, at::Tensor* norms,
                                                         std::vector<double>* gl_task_sums) {
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
    if (gl_lambda == 0.0) {
      at::parallel_for(0, n, kGrain,
                       [&](int64_t b, int64_t e) { forward_loop<scalar_t, CT>(wp, op, b, e, s, delta, Q); });
    } else {
      // Rows in blocks (gl::row_block): each task quantizes its rows and sums
      // their squares per column from zero; the blocks are added in order below.
      const int64_t rows = wc.size(0), cols = n / rows;
      const int64_t rb = gl::row_block(cols), nblocks = (rows + rb - 1) / rb;
      Scratch<double> scr(static_cast<size_t>(nblocks * cols));  // zeroed per task
      double* part = scr.data;
      at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          double* acc = part + blk * cols;
          std::fill(acc, acc + cols, 0.0);
          const int64_t r_end = std::min(rows, (blk + 1) * rb), rg = rows_per_group(cols);
          for (int64_t r = blk * rb; r < r_end; r += rg)
            forward_rows_squares<scalar_t, CT>(wp + r * cols, op + r * cols, acc, std::min(rg, r_end - r), cols, s,
                                               delta, Q);
        }
      });
      // The blocks added in order per column, and the norms, in parallel over
      // the column blocks (each one task of group_lasso_forward's order).
      *norms = at::empty({cols}, wc.options().dtype(c10::CppTypeToScalarType<CT>::value));
      CT* np = norms->mutable_data_ptr<CT>();
      const int64_t ncb = (cols + gl::kColBlock - 1) / gl::kColBlock;
      std::vector<double> cb_sums(static_cast<size_t>(ncb));
      at::parallel_for(0, ncb, ncb * nblocks * gl::kColBlock < kGrain ? ncb : 1, [&](int64_t cb0, int64_t cb1) {
        double acc[gl::kColBlock];
        for (int64_t cb = cb0; cb < cb1; ++cb) {
          const int64_t c0 = cb * gl::kColBlock, width = std::min(cols, c0 + gl::kColBlock) - c0;
          sum_blocks(part + c0, cols, nblocks, acc, width);
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

std::tuple<at::Tensor, at::Tensor> deadzone_forward_cpu(const at::Tensor& w, const at::Tensor& logit_dz,
                                                        const at::Tensor& logit_bit, double fixed_bit,
                                                        double min_bits, double max_bits, bool learnable_bit) {
  return deadzone_forward_impl(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, 0.0, nullptr,
                               nullptr);
}

// All layers with the group lasso fused in: the same bits as the per-layer
// forward followed by group_lasso_forward over the layers with a lambda.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
deadzone_forward_multi_cpu(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit,
                           at::ArrayRef<double> fixed_bit, at::ArrayRef<double> min_bits,
                           at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
                           at::ArrayRef<double> gl_lambda) {
  check_multi_lists(w, logit_dz, logit_bit, min_bits.size(), max_bits.size(), learnable_bit.size(), gl_lambda,
                    "deadzone_forward_multi");
  TORCH_CHECK(fixed_bit.size() == w.size(), "codeq.deadzone_forward_multi: fixed_bit needs one entry per weight");
  const size_t n = w.size();
  std::vector<at::Tensor> w_hat(n), scalars(n), norms(n);
  std::vector<double> task_sums;
  bool any_gl = false, all_double = true;
  for (size_t l = 0; l < n; ++l) {
    const bool gl = gl_lambda[l] != 0.0;
    std::tie(w_hat[l], scalars[l]) =
        deadzone_forward_impl(w[l], logit_dz[l], logit_bit[l], fixed_bit[l], min_bits[l], max_bits[l],
                              learnable_bit.get(l), gl_lambda[l], &norms[l], &task_sums);
    if (!gl) norms[l] = at::empty({0}, scalars[l].options());
    any_gl |= gl;
    if (gl) all_double &= w[l].scalar_type() == at::kDouble;
  }
  double total = 0.0;  // in task order, as group_lasso_forward
  for (double v : task_sums) total += v;
  const auto dt = any_gl && all_double ? at::kDouble : at::kFloat;
  return {w_hat, scalars, norms, at::scalar_tensor(total, w[0].options().dtype(dt))};
}

// The group-lasso term fused into one layer's backward: g + gl_grad * lambda
// * w_hat / ||w_hat[:, j]|| (columns of the [rows, cols] view; w_hat is
// recomputed from w, bit for bit).
struct FusedGL {
  const at::Tensor* norms = nullptr;  // [cols], the compute dtype
  double g_lambda_grad = 0.0;         // gl_grad
  double lambda = 0.0;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> deadzone_backward_impl(const at::Tensor& grad, const at::Tensor& w,
                                                                      const at::Tensor& scalars,
                                                                      const at::Tensor& logit_dz,
                                                                      const at::Tensor& logit_bit, double min_bits,
                                                                      double max_bits, bool learnable_bit,
                                                                      const FusedGL* gl) {
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

    // The group-lasso column scales (as group_lasso_backward computes them).
    std::vector<CT> scale;
    int64_t cols = 1;
    if (gl != nullptr) {
      cols = wc.size(0) == 0 ? 1 : n / wc.size(0);
      TORCH_CHECK(gl->norms->numel() == cols && gl->norms->scalar_type() == c10::CppTypeToScalarType<CT>::value,
                  "codeq.deadzone_backward_multi: norms do not match w");
      const CT g_lambda = static_cast<CT>(static_cast<CT>(gl->g_lambda_grad) * static_cast<CT>(gl->lambda));
      const at::Tensor nc = gl->norms->contiguous();
      const CT* np = nc.const_data_ptr<CT>();
      scale.resize(static_cast<size_t>(cols));
      for (int64_t j = 0; j < cols; ++j) scale[j] = gl::column_scale<CT>(g_lambda, np[j]);
    }

    // Deterministic reductions: fixed chunks, partial sums in double, summed
    // in chunk order -- the same bits for any number of threads.
    const int64_t nchunks = (n + kReduceChunk - 1) / kReduceChunk;
    std::vector<double> part_s(nchunks), part_d(nchunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * kReduceChunk, e = std::min(n, b + kReduceChunk);
        if (gl == nullptr) {
          backward_loop<scalar_t, CT>(gp, wp, out, b, e, s, delta, Q, &part_s[c], &part_d[c]);
        } else if (cols % kLanes != 0) {
          Scratch<CT> scr(static_cast<size_t>(e - b));
          CT* sc = scr.data;
          for (int64_t i = b; i < e;) {  // row segment by row segment
            const int64_t col = i % cols, len = std::min(cols - col, e - i);
            std::copy(scale.data() + col, scale.data() + col + len, sc + (i - b));
            i += len;
          }
          backward_loop_gl_flat<scalar_t, CT>(gp, wp, sc, out, b, e, s, delta, Q, &part_s[c], &part_d[c]);
        } else {
          backward_loop_gl<scalar_t, CT>(gp, wp, scale.data(), cols, out, b, e, s, delta, Q, &part_s[c], &part_d[c]);
        }
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
      set_value<TH>(g_dz, lg.theta_dz);
      set_value<TH>(g_bit, lg.theta_bit);
    });
  });
  return {grad_w.view(w.sizes()), g_dz, g_bit};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deadzone_backward_cpu(const at::Tensor& grad, const at::Tensor& w,
                                                                     const at::Tensor& scalars,
                                                                     const at::Tensor& logit_dz,
                                                                     const at::Tensor& logit_bit, double min_bits,
                                                                     double max_bits, bool learnable_bit) {
  return deadzone_backward_impl(grad, w, scalars, logit_dz, logit_bit, min_bits, max_bits, learnable_bit, nullptr);
}

// All layers' backward with the group lasso fused in (see deadzone_backward_multi in csrc/ops.cpp).
MultiGrads deadzone_backward_multi_cpu(at::TensorList grad, const at::Tensor& gl_grad, at::TensorList w,
                                       at::TensorList w_hat, at::TensorList scalars, at::TensorList norms,
                                       at::TensorList logit_dz, at::TensorList logit_bit,
                                       at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits,
                                       const c10::List<bool>& learnable_bit, at::ArrayRef<double> gl_lambda) {
  check_multi_lists(w, logit_dz, logit_bit, min_bits.size(), max_bits.size(), learnable_bit.size(), gl_lambda,
                    "deadzone_backward_multi");
  const size_t n = w.size();
  TORCH_CHECK(grad.size() == n && w_hat.size() == n && scalars.size() == n && norms.size() == n,
              "codeq.deadzone_backward_multi: grad, w_hat, scalars and norms need one entry per weight");
  bool any_gl = false;
  for (double lam : gl_lambda) any_gl |= lam != 0.0;
  double glg = 0.0;
  if (any_gl) {
    TORCH_CHECK(gl_grad.numel() == 1, "codeq.deadzone_backward_multi: gl_grad must be a one-element tensor");
    glg = double_value(gl_grad);
  }
  std::vector<at::Tensor> gw(n), gdz(n), gbit(n);
  for (size_t l = 0; l < n; ++l) {
    if (gl_lambda[l] == 0.0) {
      std::tie(gw[l], gdz[l], gbit[l]) = deadzone_backward_impl(grad[l], w[l], scalars[l], logit_dz[l], logit_bit[l],
                                                                min_bits[l], max_bits[l], learnable_bit.get(l), nullptr);
      continue;
    }
    TORCH_CHECK(w_hat[l].sizes() == w[l].sizes() && w_hat[l].scalar_type() == w[l].scalar_type(),
                "codeq.deadzone_backward_multi: w_hat[", l, "] does not match w[", l, "]");
    FusedGL gl;
    gl.norms = &norms[l];
    gl.g_lambda_grad = glg;
    gl.lambda = gl_lambda[l];
    std::tie(gw[l], gdz[l], gbit[l]) = deadzone_backward_impl(grad[l], w[l], scalars[l], logit_dz[l], logit_bit[l],
                                                              min_bits[l], max_bits[l], learnable_bit.get(l), &gl);
  }
  return {gw, gdz, gbit};
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CPU, m) {
  m.impl("abs_quantile", &abs_quantile_cpu);
  m.impl("deadzone_forward", &deadzone_forward_cpu);
  m.impl("deadzone_backward", &deadzone_backward_cpu);
  m.impl("deadzone_forward_multi", &deadzone_forward_multi_cpu);
  m.impl("deadzone_backward_multi", &deadzone_backward_multi_cpu);
}

}  // namespace cpu
}  // namespace codeq
