// Many dead-zone quantizers in one op call: deadzone_forward_multi (any
// device: it calls the per-layer ops through the dispatcher) and the generic
// deadzone_backward_multi_unfused.  What a step saves is the per-layer cost
// of Python, autograd nodes and dispatch (tens of microseconds a layer), and
// on the CPU the separate group-lasso passes (csrc/cpu/deadzone_cpu.cpp fuses
// them into the dead-zone backward).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "codeq/multi.h"

namespace codeq {

void check_multi_lists(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit, size_t n_min,
                       size_t n_max, size_t n_learn, at::ArrayRef<double> gl_lambda, const char* op) {
  const size_t n = w.size();
  TORCH_CHECK(n > 0, "codeq.", op, ": got no weights");
  TORCH_CHECK(logit_dz.size() == n && logit_bit.size() == n && n_min == n && n_max == n && n_learn == n &&
                  gl_lambda.size() == n,
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

namespace {

using FwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                 double, double, bool);
using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, const at::Tensor&,
                                                              const at::Tensor&, double, double, bool);
using GlFwdSig = std::tuple<at::Tensor, std::vector<at::Tensor>>(at::TensorList, at::ArrayRef<double>);
using GlBwdSig = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, at::ArrayRef<double>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The indices of the layers with a group-lasso term.
std::vector<size_t> gl_layers(at::ArrayRef<double> gl_lambda) {
  std::vector<size_t> idx;
  for (size_t l = 0; l < gl_lambda.size(); ++l)
    if (gl_lambda[l] != 0.0) idx.push_back(l);
  return idx;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
deadzone_forward_multi(at::TensorList w, at::TensorList logit_dz, at::TensorList logit_bit,
                       at::ArrayRef<double> fixed_bit, at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits,
                       const c10::List<bool>& learnable_bit, at::ArrayRef<double> gl_lambda) {
  check_multi_lists(w, logit_dz, logit_bit, min_bits.size(), max_bits.size(), learnable_bit.size(), gl_lambda,
                    "deadzone_forward_multi");
  TORCH_CHECK(fixed_bit.size() == w.size(), "codeq.deadzone_forward_multi: fixed_bit needs one entry per weight");
  // Below autograd: this kernel is called from an autograd.Function (or with
  // grad off); the per-layer ops must not build graphs of their own.
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto fwd = op_handle<FwdSig>("codeq::deadzone_forward");
  static const auto gl_fwd = op_handle<GlFwdSig>("codeq::group_lasso_forward");
  const size_t n = w.size();
  std::vector<at::Tensor> w_hat(n), scalars(n), norms(n);
  for (size_t l = 0; l < n; ++l) {
    std::tie(w_hat[l], scalars[l]) =
        fwd.call(w[l], logit_dz[l], logit_bit[l], fixed_bit[l], min_bits[l], max_bits[l], learnable_bit.get(l));
  }
  const auto idx = gl_layers(gl_lambda);
  at::Tensor gl_loss;
  if (idx.empty()) {
    gl_loss = at::zeros({}, w[0].options().dtype(at::kFloat));
    for (size_t l = 0; l < n; ++l) norms[l] = at::empty({0}, scalars[l].options());
  } else {
    std::vector<at::Tensor> sel;
    std::vector<double> lam;
    for (size_t l : idx) {
      sel.push_back(w_hat[l]);
      lam.push_back(gl_lambda[l]);
    }
    std::vector<at::Tensor> sel_norms;
    std::tie(gl_loss, sel_norms) = gl_fwd.call(sel, lam);
    for (size_t l = 0; l < n; ++l) norms[l] = at::empty({0}, scalars[l].options());
    for (size_t k = 0; k < idx.size(); ++k) norms[idx[k]] = sel_norms[k];
  }
  return {w_hat, scalars, norms, gl_loss};
}

}  // namespace

MultiGrads deadzone_backward_multi_unfused(at::TensorList grad, const at::Tensor& gl_grad, at::TensorList w,
                                           at::TensorList w_hat, at::TensorList scalars, at::TensorList norms,
                                           at::TensorList logit_dz, at::TensorList logit_bit,
                                           at::ArrayRef<double> min_bits, at::ArrayRef<double> max_bits,
                                           const c10::List<bool>& learnable_bit, at::ArrayRef<double> gl_lambda) {
  check_multi_lists(w, logit_dz, logit_bit, min_bits.size(), max_bits.size(), learnable_bit.size(), gl_lambda,
                    "deadzone_backward_multi");
  const size_t n = w.size();
  TORCH_CHECK(grad.size() == n && w_hat.size() == n && scalars.size() == n && norms.size() == n,
              "codeq.deadzone_backward_multi: grad, w_hat, scalars and norms need one entry per weight");
  at::AutoDispatchBelowADInplaceOrView guard;
  static const auto bwd = op_handle<BwdSig>("codeq::deadzone_backward");
  static const auto gl_bwd = op_handle<GlBwdSig>("codeq::group_lasso_backward");
  std::vector<at::Tensor> g(grad.begin(), grad.end());
  const auto idx = gl_layers(gl_lambda);
  if (!idx.empty()) {
    std::vector<at::Tensor> sel, sel_norms;
    std::vector<double> lam;
    for (size_t l : idx) {
      sel.push_back(w_hat[l]);
      sel_norms.push_back(norms[l]);
      lam.push_back(gl_lambda[l]);
    }
    const auto gl_g = gl_bwd.call(gl_grad, sel, sel_norms, lam);
    for (size_t k = 0; k < idx.size(); ++k) g[idx[k]] = at::add(g[idx[k]], gl_g[k]);
  }
  std::vector<at::Tensor> gw(n), gdz(n), gbit(n);
  for (size_t l = 0; l < n; ++l) {
    std::tie(gw[l], gdz[l], gbit[l]) = bwd.call(g[l].contiguous(), w[l], scalars[l], logit_dz[l], logit_bit[l],
                                                min_bits[l], max_bits[l], learnable_bit.get(l));
  }
  return {gw, gdz, gbit};
}

// On the CPU, deadzone_forward_multi / deadzone_backward_multi have kernels of
// their own that fuse the group lasso (csrc/cpu/deadzone_cpu.cpp); the composed
// versions, which are the CUDA kernels, are registered under *_unfused on both
// devices so that the CPU tests check them against the fused ones.
TORCH_LIBRARY_IMPL(codeq, CPU, m) {
  m.impl("deadzone_forward_multi_unfused", &deadzone_forward_multi);
  m.impl("deadzone_backward_multi_unfused", &deadzone_backward_multi_unfused);
}

#ifdef CODEQ_WITH_CUDA
TORCH_LIBRARY_IMPL(codeq, CUDA, m) {
  m.impl("deadzone_forward_multi", &deadzone_forward_multi);
  m.impl("deadzone_forward_multi_unfused", &deadzone_forward_multi);
  m.impl("deadzone_backward_multi", &deadzone_backward_multi_unfused);
  m.impl("deadzone_backward_multi_unfused", &deadzone_backward_multi_unfused);
}
#endif

}  // namespace codeq
