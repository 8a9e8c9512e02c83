// Input validation shared by the CPU and CUDA entry points (host code only).
// Every message names the op and the argument, so a user mistake reads as one
// clear line.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace codeq {

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "codeq.", op, ": ", name, " is undefined");
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, "codeq.", op, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", st);
}

inline void check_bits(double v, const char* op, const char* name) {
  TORCH_CHECK(std::isfinite(v) && v == std::floor(v) && v >= 2 && v <= 16, "codeq.", op, ": ", name,
              " must be an integer bit-width in [2, 16], got ", v);
}

inline void check_logit(const at::Tensor& t, const at::Tensor& w, const char* op, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() == 1, "codeq.", op, ": ", name, " must be a one-element tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || (t.scalar_type() == at::kDouble && w.scalar_type() == at::kDouble),
              "codeq.", op, ": ", name, " must be float32 (or float64 with float64 weights), got ", t.scalar_type(),
              " with ", w.scalar_type(), " weights; keep quantizer parameters in float32 (use autocast, not .half())");
  TORCH_CHECK(t.device() == w.device(), "codeq.", op, ": ", name, " is on ", t.device(), " but the weight is on ",
              w.device());
}

inline void check_deadzone_inputs(const at::Tensor& w, const at::Tensor& logit_dz, const at::Tensor& logit_bit,
                                  double fixed_bit, double min_bits, double max_bits, bool learnable_bit) {
  const char* op = "deadzone_forward";
  check_float_tensor(w, op, "w");
  TORCH_CHECK(w.numel() > 0, "codeq.", op, ": the weight tensor is empty");
  check_logit(logit_dz, w, op, "logit_dz");
  check_logit(logit_bit, w, op, "logit_bit");
  TORCH_CHECK(logit_dz.scalar_type() == logit_bit.scalar_type(), "codeq.", op,
              ": logit_dz and logit_bit must have the same dtype");
  if (learnable_bit) {
    check_bits(min_bits, op, "min_bits");
    check_bits(max_bits, op, "max_bits");
    TORCH_CHECK(min_bits <= max_bits, "codeq.", op, ": min_bits (", min_bits, ") exceeds max_bits (", max_bits, ")");
  } else {
    check_bits(fixed_bit, op, "fixed_bit");
  }
}

inline void check_deadzone_backward_inputs(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scalars,
                                           const at::Tensor& logit_dz, const at::Tensor& logit_bit) {
  const char* op = "deadzone_backward";
  check_float_tensor(grad, op, "grad");
  check_float_tensor(w, op, "w");
  TORCH_CHECK(grad.sizes() == w.sizes(), "codeq.", op, ": grad has shape ", grad.sizes(), " but w has ", w.sizes());
  TORCH_CHECK(grad.scalar_type() == w.scalar_type(), "codeq.", op, ": grad dtype ", grad.scalar_type(),
              " differs from w dtype ", w.scalar_type());
  TORCH_CHECK(grad.device() == w.device(), "codeq.", op, ": grad and w are on different devices");
  const auto ct = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scalars.numel() == 6 && scalars.scalar_type() == ct && scalars.device() == w.device(), "codeq.", op,
              ": scalars must be the 6-element ", ct, " tensor returned by deadzone_forward");
  check_logit(logit_dz, w, op, "logit_dz");
  check_logit(logit_bit, w, op, "logit_bit");
}

}  // namespace codeq
