// Uniform symmetric quantizer (registry name "uniform"), shared CPU/CUDA math.
//   a = max|w|, Q = 2^(b-1) - 1, s = a / Q,
//   w_hat = s * clamp(round(w / s), -Q, Q)          (a == 0: zeros, zero grad)
// Backward: round is straight-through, the clamp masks the gradient outside
// [-Q, Q] (the spec; the bounds themselves pass it, as the published code's
// torch.clamp did up to torch 2.11); autograd of the reference evaluates it
// as ((g*s) masked) / s.
#pragma once

#include "codeq/common.h"

namespace codeq {
namespace uniform {

template <typename CT>
CODEQ_HD CT levels(int64_t bitwidth) {
  return static_cast<CT>(ldexp(1.0, static_cast<int>(bitwidth) - 1) - 1.0);
}

template <typename CT>
CODEQ_HD CT forward_element(CT w, CT a, CT s, CT Q) {
  if (a == CT(0)) return CT(0);
  return mul_rn(s, round_small(clamp_nan(w / s, -Q, Q)));
}

template <typename CT>
CODEQ_HD CT backward_element(CT g, CT w, CT a, CT s, CT Q) {
  if (a == CT(0)) return CT(0);
  // The gradient passes inside [-Q, Q], bounds included (where the max-|w|
  // element always lands); zero beyond them and for NaN.
  const CT x = w / s;
  const CT r = round_small(clamp_nan(x, -(Q + CT(1)), Q + CT(1)));
  const bool inside = r >= -Q && r <= Q;
  return inside ? mul_rn(g, s) / s : CT(0);
}

}  // namespace uniform
}  // namespace codeq
