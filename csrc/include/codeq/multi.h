// The multi-layer dead-zone ops (csrc/multi.cpp): declarations shared by the
// generic (any device) implementation and the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <tuple>
#include <vector>

namespace codeq {

using MultiGrads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Checks the list arguments of the multi ops (equal lengths, lambdas >= 0,
// 2-D or more where lambda != 0); `op` names the op in the message.
void check_multi_lists(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit, size_t n_min,
                       size_t n_max, size_t n_learn, at::ArrayRef<double> gl_lambda, const char* op);

MultiGrads deadzone_backward_multi_unfused(at::TensorList grad, const at::Tensor& gl_grad, at::TensorList w,
                                           at::TensorList w_hat, at::TensorList scalars, at::TensorList norms,
                                           at::TensorList logit_dz, at::TensorList logit_bit,
                                           at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits,
                                           const c10::List<bool>& learnable_bit, at::ArrayRef<double> gl_lambda);

}  // namespace codeq
