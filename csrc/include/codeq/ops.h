// Host-side pieces shared by the CPU and CUDA kernels of the codeq ops: the
// return types of the list ops and the checks of their arguments.  Every
// message names the op and the argument, so that a user mistake reads as one
// clear line.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace codeq {

// deadzone_forward: (w_hat[], gl_loss, scalars[], norms[]).
using DeadZoneOutputs = std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;
// deadzone_backward: (dL/dw[], dL/dlogit_dz[], dL/dlogit_bit[]).
using DeadZoneGrads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// The dtype of a group-lasso loss over these weights: float64 when every one
// is float64, float32 otherwise.
inline at::ScalarType loss_dtype(at::TensorList weights) {
  if (weights.empty()) return at::kFloat;
  for (const auto& w : weights)
    if (w.scalar_type() != at::kDouble) return at::kFloat;
  return at::kDouble;
}

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

// One layer of deadzone_forward.
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

// One layer of deadzone_backward.
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
  TORCH_CHECK(logit_dz.scalar_type() == logit_bit.scalar_type(), "codeq.", op,
              ": logit_dz and logit_bit must have the same dtype");
}

// The list arguments of deadzone_forward (and of deadzone_backward, op):
// one entry per weight in each, lambdas finite and >= 0, 2 dims or more where
// lambda != 0, one device.
inline void check_deadzone_lists(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit, size_t n_fixed,
                                 size_t n_min, size_t n_max, size_t n_learn, at::ArrayRef<double> gl_lambda,
                                 const char* op) {
  const size_t n = w.size();
  TORCH_CHECK(n > 0, "codeq.", op, ": got no weights");
  TORCH_CHECK(logit_dz.size() == n && logit_bit.size() == n && n_fixed == n && n_min == n && n_max == n &&
                  n_learn == n && gl_lambda.size() == n,
              "codeq.", op, ": every list argument must have one entry per weight (", n, " weights)");
  for (size_t l = 0; l < n; ++l) {
    TORCH_CHECK(std::isfinite(gl_lambda[l]) && gl_lambda[l] >= 0.0, "codeq.", op, ": gl_lambda[", l,
                "] must be finite and >= 0, got ", gl_lambda[l]);
    TORCH_CHECK(gl_lambda[l] == 0.0 || w[l].dim() >= 2, "codeq.", op, ": w[", l,
                "] has a group-lasso lambda but fewer than 2 dims (", w[l].sizes(), ")");
    TORCH_CHECK(w[l].device() == w[0].device(), "codeq.", op, ": all weights must be on one device (w[0] on ",
                w[0].device(), ", w[", l, "] on ", w[l].device(), ")");
  }
}

inline void check_deadzone_backward_lists(at::TensorList grad, const at::Tensor& gl_grad, at::TensorList w,
                                          at::TensorList w_hat, at::TensorList scalars, at::TensorList norms,
                                          at::TensorList logit_dz, at::TensorList logit_bit, size_t n_min,
                                          size_t n_max, size_t n_learn, at::ArrayRef<double> gl_lambda) {
  const char* op = "deadzone_backward";
  check_deadzone_lists(w, logit_dz, logit_bit, w.size(), n_min, n_max, n_learn, gl_lambda, op);
  const size_t n = w.size();
  TORCH_CHECK(grad.size() == n && w_hat.size() == n && scalars.size() == n && norms.size() == n, "codeq.", op,
              ": grad, w_hat, scalars and norms need one entry per weight");
  bool any_gl = false;
  for (size_t l = 0; l < n; ++l) {
    if (gl_lambda[l] == 0.0) continue;
    any_gl = true;
    TORCH_CHECK(w_hat[l].sizes() == w[l].sizes() && w_hat[l].scalar_type() == w[l].scalar_type(), "codeq.", op,
                ": w_hat[", l, "] does not match w[", l, "]");
  }
  TORCH_CHECK(!any_gl || gl_grad.numel() == 1, "codeq.", op, ": gl_grad must be a one-element tensor");
}

// uniform_forward / uniform_backward.
inline void check_bitwidth(int64_t b, const char* op) {
  TORCH_CHECK(b >= 2 && b <= 16, "codeq.", op, ": bitwidth must be an integer in [2, 16], got ", b);
}

inline void check_uniform_inputs(const at::Tensor& w, int64_t bitwidth) {
  check_float_tensor(w, "uniform_forward", "w");
  TORCH_CHECK(w.numel() > 0, "codeq.uniform_forward: the weight tensor is empty");
  check_bitwidth(bitwidth, "uniform_forward");
}

inline void check_uniform_backward_inputs(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
                                          int64_t bitwidth) {
  check_float_tensor(grad, "uniform_backward", "grad");
  check_float_tensor(w, "uniform_backward", "w");
  check_bitwidth(bitwidth, "uniform_backward");
  TORCH_CHECK(grad.sizes() == w.sizes() && grad.scalar_type() == w.scalar_type(),
              "codeq.uniform_backward: grad must have the shape and dtype of w");
  const auto ct = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.numel() == 2 && scale.scalar_type() == ct,
              "codeq.uniform_backward: scale must be the 2-element tensor returned by uniform_forward");
}

// group_lasso_forward / group_lasso_backward: one lambda per weight, float
// weights of 2 dims or more, all on weights[0]'s device.
inline void check_group_lasso_layers(at::TensorList weights, at::ArrayRef<double> lambdas, const char* op) {
  TORCH_CHECK(weights.size() == lambdas.size(), "codeq.", op, ": got ", weights.size(), " weights but ",
              lambdas.size(), " lambdas");
  for (size_t l = 0; l < weights.size(); ++l) {
    check_float_tensor(weights[l], op, "weights[i]");
    TORCH_CHECK(weights[l].dim() >= 2, "codeq.", op, ": weights[", l, "] must have at least 2 dims (out, in, ...), got ",
                weights[l].sizes());
    TORCH_CHECK(weights[l].device() == weights[0].device(), "codeq.", op, ": weights[", l, "] is on ",
                weights[l].device(), " but weights[0] is on ", weights[0].device());
  }
}

}  // namespace codeq
