// Shared element-wise helpers for the CPU and CUDA kernels of codeq.
//
// Every function here is written once and compiled for both the host (CPU
// kernels, built with -ffp-contract=off so that no a*b+c is fused behind our
// back) and the device (where the explicit __fmul_rn/__fadd_rn family is used
// when a result must not be contracted).  The semantics follow torch's own
// element-wise ops, because the pure-PyTorch reference (codeq/reference.py) is
// the oracle these kernels are tested against:
//   sign(x)  = (0 < x) - (x < 0)        -> sign(NaN) == 0, as torch.sign
//   clamp    = propagates NaN            as torch.clamp
//   round    = half to even              as torch.round
#pragma once

#include <cmath>
#include <cstdint>

// CODEQ_DEVICE_CODE: compiled by nvcc (host and device passes).  The device
// intrinsics below are selected with __CUDA_ARCH__, i.e. only in the device
// pass; the host pass of a .cu file and the CPU build (.cpp, g++) compile the
// plain C++ branches, which are the CPU kernels' code, unchanged.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CODEQ_HD __host__ __device__ __forceinline__
#define CODEQ_DEVICE_CODE 1
#else
#define CODEQ_HD inline
#endif

namespace codeq {

using std::fabs;
using std::ldexp;
using std::tanh;

// Compute type for a storage type: float for float/half/bfloat16, double for
// double.  (Half types are computed in float32 inside, see the spec.)
template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };

CODEQ_HD float copysign_of(float mag, float sign) { return copysignf(mag, sign); }
CODEQ_HD double copysign_of(double mag, double sign) { return copysign(mag, sign); }

// torch.sign: -1, 0 or 1, and +0 for +-0 and NaN -- the value of
// (0 < x) - (x < 0), written as a select of copysign(1, x), which vectorises
// to a compare and a sign-bit operation.
template <typename T>
CODEQ_HD T sgn(T x) {
  return (x < T(0) || x > T(0)) ? copysign_of(T(1), x) : T(0);
}

// torch.clamp(x, lo, hi): NaN stays NaN.  In the operand order of the x86
// max/min instructions ((a > b) ? a : b), so that it vectorises to one of each.
template <typename T>
CODEQ_HD T clamp_nan(T x, T lo, T hi) {
  const T t = lo > x ? lo : x;
  return hi < t ? hi : t;
}

// Round half to even for |x| <= 2^22 (float) / 2^51 (double) or NaN.  On the host this is the classic "add and subtract 1.5*2^mantissa"
// trick, which vectorises with plain SSE2/NEON (std::nearbyint would be a libm
// call per element); it is exact in round-to-nearest mode because the sum is
// rounded once to an integer.  Callers only use it on values already clamped
// to the quantizer range [-Q, Q] (Q <= 2^15), where it equals torch.round
// (the sign of a zero included: the sum alone would turn -0.3 into +0).
CODEQ_HD float round_small(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return copysignf((x + magic) - magic, x);  // -0.3 -> -0, as rintf and torch.round
#endif
}
CODEQ_HD double round_small(double x) {
#ifdef __CUDA_ARCH__
  return rint(x);
#else
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  return copysign((x + magic) - magic, x);
#endif
}

// tanh for the logits.  float: evaluated in double and rounded once, which is
// the correctly rounded tanhf in all but ~2^-29 of the cases, and the same on
// the host and the device (glibc's tanhf and CUDA's tanhf are each up to 1-2
// ulp off, in different places; torch's own CPU tanh is closer to this one).
CODEQ_HD float tanh_cr(float x) { return static_cast<float>(tanh(static_cast<double>(x))); }
CODEQ_HD double tanh_cr(double x) { return tanh(x); }

// a*b and a+b that the device compiler must not contract into an FMA, so that
// the CPU and CUDA kernels round every intermediate exactly as torch's eager
// (unfused) reference does.
CODEQ_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CODEQ_HD double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
CODEQ_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
CODEQ_HD double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

}  // namespace codeq
