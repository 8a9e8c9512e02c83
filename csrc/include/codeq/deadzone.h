// The CoDeQ dead-zone compander, written once for the CPU and the CUDA kernels.
// Equations and their order of evaluation follow docs/quantizer-math.md and
// codeq/reference.py line by line, so that the kernels round like the eager
// reference (see the parity contract there).
#pragma once

#include "codeq/common.h"

namespace codeq {
namespace dz {

// Layout of the small "scalars" tensor that deadzone_forward returns and
// deadzone_backward consumes (dtype: the compute type, float or double).
enum ScalarIndex : int {
  kA = 0,      // a = quantile(|w|, 0.99)
  kB = 1,      // bit-width B
  kD = 2,      // dead-zone width d
  kQ = 3,      // largest level Q = 2^(B-1) - 1
  kS = 4,      // step s
  kDelta = 5,  // shift delta
  kNumScalars = 6
};

// ---------------------------------------------------------------- quantile --
// Rank of the q-quantile as torch.quantile computes it: the probability is
// first rounded to the compute type T (0.99f for float), the rank p = q*(n-1)
// is then formed in double, lo = floor(p), and the interpolation weight p - lo
// is rounded back to T.
template <typename T>
struct QuantileRank {
  int64_t lo;
  int64_t hi;
  T weight;
};

template <typename T>
CODEQ_HD QuantileRank<T> quantile_rank(int64_t n, double q) {
  const double p = static_cast<double>(static_cast<T>(q)) * static_cast<double>(n - 1);
  int64_t lo = static_cast<int64_t>(p);  // p >= 0
  if (lo > n - 1) lo = n - 1;
  QuantileRank<T> r;
  r.lo = lo;
  r.hi = lo + 1 < n ? lo + 1 : n - 1;
  r.weight = static_cast<T>(p - static_cast<double>(lo));
  return r;
}

// torch.lerp's formula, every product and sum rounded on its own.
template <typename T>
CODEQ_HD T lerp(T lo, T hi, T w) {
  const T diff = add_rn(hi, -lo);
  return w < T(0.5) ? add_rn(lo, mul_rn(w, diff)) : add_rn(hi, -mul_rn(diff, add_rn(T(1), -w)));
}

// ----------------------------------------------------------------- scalars --
// CT: compute type of the layer (float, or double for float64 weights).
// TH: dtype of the logits (float32 parameters, or float64 after .double()).
template <typename CT>
struct Scalars {
  CT a, B, d, Q, s, delta;
};

template <typename CT, typename TH>
CODEQ_HD Scalars<CT> compute_scalars(CT a, TH theta_dz, TH theta_bit, bool learnable_bit,
                                     TH fixed_bit, TH min_bits, TH max_bits) {
  Scalars<CT> r;
  r.a = a;
  // B = round((max - min) * |tanh(theta_bit)| + min)          (dtype TH)
  TH B;
  if (learnable_bit) {
    const TH t = tanh_cr(theta_bit);
    B = round_small(add_rn(mul_rn(add_rn(max_bits, -min_bits), fabs(t)), min_bits));
  } else {
    B = fixed_bit;
  }
  // Q = 2^(B-1) - 1   (exact: B is a small integer)
  const TH Q = add_rn(static_cast<TH>(ldexp(1.0, static_cast<int>(B) - 1)), TH(-1));
  // d = (2 * a) * (1 - |tanh(theta_dz)|)
  const TH one_minus_t = add_rn(TH(1), -static_cast<TH>(fabs(tanh_cr(theta_dz))));
  const CT d = mul_rn(mul_rn(CT(2), a), static_cast<CT>(one_minus_t));
  // s = (a - d/2) / (Q - 0.5) + 1e-8
  const CT s = add_rn((add_rn(a, -(d / CT(2)))) / static_cast<CT>(add_rn(Q, TH(-0.5))), static_cast<CT>(1e-8));
  r.B = static_cast<CT>(B);
  r.Q = static_cast<CT>(Q);
  r.d = d;
  r.s = s;
  // delta = d/2 - s/2
  r.delta = add_rn(d / CT(2), -(s / CT(2)));
  return r;
}

// ------------------------------------------------------------- per element --
// u/s for one weight: u = sign(w) * max(|w| - delta, 0).
template <typename CT>
CODEQ_HD CT scaled_u(CT w, CT s, CT delta) {
  const CT r = add_rn(fabs(w), -delta);  // never -0: |w| >= +0 and x + (-x) is +0
  const CT relu = CT(0) > r ? CT(0) : r;  // relu keeps NaN, like torch (one max instruction)
  // sign(w) * relu: +-relu where w is non-zero (relu >= 0 or NaN, so that is
  // copysign), 0 * relu where w is +-0 or NaN (sign(w) is +0 there).
  const CT u = (w < CT(0) || w > CT(0)) ? copysign_of(relu, w) : mul_rn(CT(0), relu);
  return u / s;
}

// The integer level q = clamp(round(u/s), -Q, Q), from x = u/s.
template <typename CT>
CODEQ_HD CT level(CT x, CT Q) {
  return round_small(clamp_nan(x, -Q, Q));
}

// w_hat = s*q + delta*sign(q)
template <typename CT>
CODEQ_HD CT dequant(CT q, CT s, CT delta) {
  return add_rn(mul_rn(s, q), mul_rn(delta, sgn(q)));
}

template <typename CT>
CODEQ_HD CT forward_element(CT w, CT s, CT delta, CT Q) {
  return dequant(level(scaled_u(w, s, delta), Q), s, delta);
}

// One element of the backward: returns dL/dw and adds its terms to the two
// reductions G_s = sum g*(q - u/s) and G_delta = sum g*(sign(q) - sign(w)).
// dL/dw is g*sign(w)*sign(w): the spec's value in exact arithmetic.  The
// reference's autograd graph evaluates ((g*s)/s)*sign(w)*sign(w), whose
// division by s can move the result by an ulp; the parity contract allows
// that (rtol 1e-6), and leaving the division out saves a vector division per
// element, the slowest instruction of the CPU loop.
// What the division does keep: for s = Inf or NaN (the quantile of a weight
// with over 1% Inf, or with a NaN) the reference's dL/dw is NaN everywhere,
// and so is this one (the factor (s - s) + 1, hoisted out of the loops).
template <typename CT>
struct BackwardTerms {
  CT grad_w;
  CT gs;      // g * (q - u/s)
  CT gdelta;  // g * (sign(q) - sign(w))
};

// The terms of one element from its x = u/s and level q (shared by
// backward_element and the CPU kernel that fuses the group lasso in).
template <typename CT>
CODEQ_HD BackwardTerms<CT> backward_terms(CT g, CT w, CT x, CT q, CT s) {
  const CT sw = sgn(w);
  BackwardTerms<CT> t;
  const CT nan_unless_finite = add_rn(add_rn(s, -s), CT(1));  // 1, or NaN when s is not finite
  t.grad_w = mul_rn(mul_rn(g, sw), mul_rn(sw, nan_unless_finite));
  t.gs = mul_rn(g, add_rn(q, -x));
  t.gdelta = mul_rn(g, add_rn(sgn(q), -sw));
  return t;
}

template <typename CT>
CODEQ_HD BackwardTerms<CT> backward_element(CT g, CT w, CT s, CT delta, CT Q) {
  const CT x = scaled_u(w, s, delta);
  return backward_terms(g, w, x, level(x, Q), s);
}

// ------------------------------------------------------------------ chain --
// From the two reductions to the gradients of the logits (the spec's
// "Chain to the scalars"); evaluated in double.
struct LogitGrads {
  double theta_dz;
  double theta_bit;
};

template <typename CT, typename TH>
CODEQ_HD LogitGrads chain_to_logits(double G_s, double G_delta, const Scalars<CT>& sc, TH theta_dz,
                                    TH theta_bit, bool learnable_bit, TH min_bits, TH max_bits) {
  const double a = sc.a, d = sc.d, Q = sc.Q, B = sc.B;
  const double dL_ds = G_s - G_delta / 2.0;
  const double dL_dd = G_delta / 2.0 - dL_ds / (2.0 * (Q - 0.5));
  const double dL_dQ = -dL_ds * (a - d / 2.0) / ((Q - 0.5) * (Q - 0.5));
  LogitGrads r;
  const double t_dz = static_cast<double>(tanh_cr(theta_dz));
  r.theta_dz = dL_dd * (-2.0 * a * static_cast<double>(sgn(t_dz)) * (1.0 - t_dz * t_dz));
  if (learnable_bit) {
    const double t_bit = static_cast<double>(tanh_cr(theta_bit));
    const double dQ_dB = ldexp(1.0, static_cast<int>(B) - 1) * 0.69314718055994530942;
    r.theta_bit = dL_dQ * dQ_dB * static_cast<double>(max_bits - min_bits) *
                  static_cast<double>(sgn(t_bit)) * (1.0 - t_bit * t_bit);
  } else {
    r.theta_bit = 0.0;
  }
  return r;
}

}  // namespace dz
}  // namespace codeq
