// Autograd of the differentiable codeq ops, registered under the Autograd
// key: one torch::autograd::Function per op, whose forward calls the op below
// autograd and whose backward calls the op's *_backward.  Written in C++ so
// that a training step pays no Python for them (benchmarks/results/
// ab_special_paths.md); torch.compile traces through them to the ops, whose
// fake kernels are in codeq/ops.py.  None has a double backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "codeq/ops.h"

namespace codeq {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void no_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "codeq.", op,
              " has no double backward: call backward without create_graph=True");
}

// A gradient that arrives undefined (its output was not used): zeros, as
// autograd would have made them.
at::Tensor grad_or_zeros(const at::Tensor& g, const at::Tensor& like) {
  return g.defined() ? g.contiguous() : at::zeros_like(like, at::MemoryFormat::Contiguous);
}

// ------------------------------------------------------------ dead zone --
using DzFwdSig = DeadZoneOutputs(at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>,
                                 at::ArrayRef<double>, at::ArrayRef<double>, const c10::List<bool>&,
                                 at::ArrayRef<double>);
using DzBwdSig = DeadZoneGrads(at::TensorList, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                               at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>,
                               at::ArrayRef<double>, const c10::List<bool>&, at::ArrayRef<double>);

// Outputs: w_hat[0..n), gl_loss, scalars[0..n), norms[0..n) (the last 2n
// without gradient).  Saved: w, logit_dz, logit_bit, w_hat, scalars, norms.
struct DeadZone : public torch::autograd::Function<DeadZone> {
  static variable_list forward(AutogradContext* ctx, at::TensorList w, at::TensorList logit_dz,
                               at::TensorList logit_bit, at::ArrayRef<double> fixed_bit,
                               at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits,
                               const c10::List<bool>& learnable_bit, at::ArrayRef<double> gl_lambda) {
    static const auto op = op_handle<DzFwdSig>("codeq::deadzone_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w_hat, gl_loss, scalars, norms] =
        op.call(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda);
    const size_t n = w.size();
    variable_list out;
    out.reserve(3 * n + 1);
    out.insert(out.end(), w_hat.begin(), w_hat.end());
    out.push_back(gl_loss);
    out.insert(out.end(), scalars.begin(), scalars.end());
    out.insert(out.end(), norms.begin(), norms.end());

    variable_list save;
    save.reserve(6 * n);
    save.insert(save.end(), w.begin(), w.end());
    save.insert(save.end(), logit_dz.begin(), logit_dz.end());
    save.insert(save.end(), logit_bit.begin(), logit_bit.end());
    save.insert(save.end(), out.begin(), out.begin() + n);    // w_hat
    save.insert(save.end(), out.begin() + n + 1, out.end());  // scalars, norms
    ctx->save_for_backward(std::move(save));
    ctx->mark_non_differentiable(variable_list(out.begin() + n + 1, out.end()));
    ctx->set_materialize_grads(false);
    ctx->saved_data["n"] = static_cast<int64_t>(n);
    ctx->saved_data["min_bits"] = std::vector<double>(min_bits.begin(), min_bits.end());
    ctx->saved_data["max_bits"] = std::vector<double>(max_bits.begin(), max_bits.end());
    ctx->saved_data["learnable_bit"] = learnable_bit;
    ctx->saved_data["gl_lambda"] = std::vector<double>(gl_lambda.begin(), gl_lambda.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    no_double_backward("deadzone_forward");
    static const auto op = op_handle<DzBwdSig>("codeq::deadzone_backward");
    const auto n = static_cast<size_t>(ctx->saved_data["n"].toInt());
    const variable_list saved = ctx->get_saved_variables();
    const at::TensorList all(saved);
    const auto w = all.slice(0, n), dz = all.slice(n, n), bit = all.slice(2 * n, n);
    const auto w_hat = all.slice(3 * n, n), scalars = all.slice(4 * n, n), norms = all.slice(5 * n, n);
    std::vector<at::Tensor> g(n);
    for (size_t l = 0; l < n; ++l) g[l] = grad_or_zeros(grads[l], w_hat[l]);
    const at::Tensor gl_grad = grads[n].defined() ? grads[n] : at::zeros({}, scalars[0].options());
    auto [gw, gdz, gbit] =
        op.call(g, gl_grad, w, w_hat, scalars, norms, dz, bit, ctx->saved_data["min_bits"].toDoubleVector(),
                ctx->saved_data["max_bits"].toDoubleVector(), ctx->saved_data["learnable_bit"].toBoolList(),
                ctx->saved_data["gl_lambda"].toDoubleVector());
    variable_list res;
    res.reserve(3 * n + 5);
    res.insert(res.end(), gw.begin(), gw.end());
    res.insert(res.end(), gdz.begin(), gdz.end());
    res.insert(res.end(), gbit.begin(), gbit.end());
    res.resize(3 * n + 5);  // fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda: none
    return res;
  }
};

DeadZoneOutputs deadzone_forward_autograd(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit,
                                          at::ArrayRef<double> fixed_bit, at::ArrayRef<double> min_bits,
                                          at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
                                          at::ArrayRef<double> gl_lambda) {
  const size_t n = w.size();
  TORCH_CHECK(logit_dz.size() == n && logit_bit.size() == n,
              "codeq.deadzone_forward: w, logit_dz and logit_bit need one entry per weight");
  const variable_list out =
      DeadZone::apply(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda);
  const at::TensorList o(out);
  return {o.slice(0, n).vec(), out[n], o.slice(n + 1, n).vec(), o.slice(2 * n + 1, n).vec()};
}

// -------------------------------------------------------------- uniform --
struct Uniform : public torch::autograd::Function<Uniform> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& w, int64_t bitwidth) {
    using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t);
    static const auto op = op_handle<Sig>("codeq::uniform_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [w_hat, scale] = op.call(w, bitwidth);
    ctx->save_for_backward({w, scale});
    ctx->mark_non_differentiable({scale});
    ctx->set_materialize_grads(false);
    ctx->saved_data["bitwidth"] = bitwidth;
    return {w_hat, scale};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    no_double_backward("uniform_forward");
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
    static const auto op = op_handle<Sig>("codeq::uniform_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor g = grad_or_zeros(grads[0], saved[0]);
    return {op.call(g, saved[0], saved[1], ctx->saved_data["bitwidth"].toInt()), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> uniform_forward_autograd(const at::Tensor& w, int64_t bitwidth) {
  const variable_list out = Uniform::apply(w, bitwidth);
  return {out[0], out[1]};
}

// ---------------------------------------------------------- group lasso --
struct GroupLasso : public torch::autograd::Function<GroupLasso> {
  static variable_list forward(AutogradContext* ctx, at::TensorList weights, at::ArrayRef<double> lambdas) {
    using Sig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::ArrayRef<double>);
    static const auto op = op_handle<Sig>("codeq::group_lasso_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, norms] = op.call(weights, lambdas);
    variable_list save(weights.begin(), weights.end());
    save.insert(save.end(), norms.begin(), norms.end());
    ctx->save_for_backward(std::move(save));
    ctx->mark_non_differentiable(norms);
    ctx->set_materialize_grads(false);
    ctx->saved_data["lambdas"] = std::vector<double>(lambdas.begin(), lambdas.end());
    variable_list out{loss};
    out.insert(out.end(), norms.begin(), norms.end());
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    no_double_backward("group_lasso_forward");
    using Sig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, at::ArrayRef<double>);
    static const auto op = op_handle<Sig>("codeq::group_lasso_backward");
    const variable_list saved = ctx->get_saved_variables();
    const size_t n = saved.size() / 2;
    const at::TensorList all(saved);
    const at::Tensor g = grads[0].defined() ? grads[0] : at::zeros({}, saved.empty() ? at::TensorOptions() : saved[0].options());
    variable_list res = op.call(g, all.slice(0, n), all.slice(n, n), ctx->saved_data["lambdas"].toDoubleVector());
    res.emplace_back();  // lambdas: none
    return res;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> group_lasso_forward_autograd(at::TensorList weights,
                                                                             at::ArrayRef<double> lambdas) {
  const variable_list out = GroupLasso::apply(weights, lambdas);
  return {out[0], std::vector<at::Tensor>(out.begin() + 1, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, Autograd, m) {
  m.impl("deadzone_forward", &deadzone_forward_autograd);
  m.impl("uniform_forward", &uniform_forward_autograd);
  m.impl("group_lasso_forward", &group_lasso_forward_autograd);
}

}  // namespace codeq
