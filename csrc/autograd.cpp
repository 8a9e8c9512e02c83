// codeq::deadzone_multi: deadzone_forward_multi with its autograd in C++.
//
// The training fast path (codeq/fastpath.py) quantizes every weight of a
// model in one call per step.  A Python torch.autograd.Function around
// deadzone_forward_multi costs ~100 us a step on a CPU in Python alone (the
// apply, argument binding, saving, the backward's list handling), which is a
// large part of a small model's step; this node does the same in C++.  It is
// registered as CompositeImplicitAutograd, so it works on every device the two
// ops have kernels for; torch.compile does not use it (it traces the per-layer
// ops of codeq/ops.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace codeq {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdMultiSig = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>(
    at::TensorList, at::TensorList, at::TensorList, at::ArrayRef<double>, at::ArrayRef<double>, at::ArrayRef<double>,
    const c10::List<bool>&, at::ArrayRef<double>);
using BwdMultiSig = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    at::TensorList, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
    at::TensorList, at::ArrayRef<double>, at::ArrayRef<double>, const c10::List<bool>&, at::ArrayRef<double>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Outputs: w_hat[0..n), gl, scalars[0..n), norms[0..n) (the last 2n without
// gradient).  Saved: w, logit_dz, logit_bit, w_hat, scalars, norms.
struct DeadZoneMulti : public torch::autograd::Function<DeadZoneMulti> {
  static variable_list forward(AutogradContext* ctx, at::TensorList w, at::TensorList logit_dz,
                               at::TensorList logit_bit, at::ArrayRef<double> fixed_bit,
                               at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits,
                               const c10::List<bool>& learnable_bit, at::ArrayRef<double> gl_lambda) {
    static const auto fwd = op_handle<FwdMultiSig>("codeq::deadzone_forward_multi");
    auto [w_hat, scalars, norms, gl] =
        fwd.call(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda);
    const size_t n = w.size();
    variable_list out;
    out.reserve(3 * n + 1);
    out.insert(out.end(), w_hat.begin(), w_hat.end());
    out.push_back(gl);
    out.insert(out.end(), scalars.begin(), scalars.end());
    out.insert(out.end(), norms.begin(), norms.end());

    variable_list save;
    save.reserve(6 * n);
    save.insert(save.end(), w.begin(), w.end());
    save.insert(save.end(), logit_dz.begin(), logit_dz.end());
    save.insert(save.end(), logit_bit.begin(), logit_bit.end());
    save.insert(save.end(), out.begin(), out.begin() + n);      // w_hat
    save.insert(save.end(), out.begin() + n + 1, out.end());    // scalars, norms
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
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "codeq.deadzone_multi has no double backward: call backward without create_graph=True, or train "
                "with fused_weights: false");
    static const auto bwd = op_handle<BwdMultiSig>("codeq::deadzone_backward_multi");
    const auto n = static_cast<size_t>(ctx->saved_data["n"].toInt());
    const variable_list saved = ctx->get_saved_variables();
    const at::TensorList all(saved);
    const auto w = all.slice(0, n), dz = all.slice(n, n), bit = all.slice(2 * n, n);
    const auto w_hat = all.slice(3 * n, n), scalars = all.slice(4 * n, n), norms = all.slice(5 * n, n);
    // Gradients of unused outputs arrive undefined (materialize_grads is off):
    // zeros, as autograd would have made them.
    std::vector<at::Tensor> g(n);
    for (size_t l = 0; l < n; ++l) {
      const at::Tensor& gl = grads[l];
      g[l] = gl.defined() ? gl.contiguous() : at::zeros_like(w_hat[l], at::MemoryFormat::Contiguous);
    }
    const at::Tensor gl_grad = grads[n].defined() ? grads[n] : at::zeros({}, scalars[0].options());
    const auto min_bits = ctx->saved_data["min_bits"].toDoubleVector();
    const auto max_bits = ctx->saved_data["max_bits"].toDoubleVector();
    const auto learnable_bit = ctx->saved_data["learnable_bit"].toBoolList();
    const auto gl_lambda = ctx->saved_data["gl_lambda"].toDoubleVector();
    auto [gw, gdz, gbit] = bwd.call(g, gl_grad, w, w_hat, scalars, norms, dz, bit, min_bits, max_bits, learnable_bit,
                                    gl_lambda);
    variable_list res;
    res.reserve(3 * n + 5);
    res.insert(res.end(), gw.begin(), gw.end());
    res.insert(res.end(), gdz.begin(), gdz.end());
    res.insert(res.end(), gbit.begin(), gbit.end());
    res.resize(3 * n + 5);  // fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda: no gradient
    return res;
  }
};

std::tuple<std::vector<at::Tensor>, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> deadzone_multi(
    at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit, at::ArrayRef<double> fixed_bit,
    at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits, const c10::List<bool>& learnable_bit,
    at::ArrayRef<double> gl_lambda) {
  const size_t n = w.size();
  TORCH_CHECK(n > 0, "codeq.deadzone_multi: got no weights");
  TORCH_CHECK(logit_dz.size() == n && logit_bit.size() == n,
              "codeq.deadzone_multi: w, logit_dz and logit_bit need one entry per weight");
  const variable_list out =
      DeadZoneMulti::apply(w, logit_dz, logit_bit, fixed_bit, min_bits, max_bits, learnable_bit, gl_lambda);
  const at::TensorList o(out);
  return {o.slice(0, n).vec(), out[n], o.slice(n + 1, n).vec(), o.slice(2 * n + 1, n).vec()};
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CompositeImplicitAutograd, m) {
  m.impl("deadzone_multi", &deadzone_multi);
}

}  // namespace codeq
