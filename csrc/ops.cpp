// The codeq operators: their schemas, defined here once, and the Python
// module codeq._C.
//
// Each backend registers its kernels in its own files (csrc/cpu/*.cpp with
// TORCH_LIBRARY_IMPL(codeq, CPU, ...), csrc/cuda/*.cu with
// TORCH_LIBRARY_IMPL(codeq, CUDA, ...)); csrc/autograd.cpp registers the
// autograd of the differentiable ops; codeq/ops.py their fake kernels.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "cpu/quantile_cpu.h"

#ifndef CODEQ_CUDA_ARCHS
#define CODEQ_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(codeq, m) {
  m.set_python_module("codeq.ops");
  // q-quantile of |x| (exact, as torch.quantile of the flattened |x|); 0-dim,
  // float32 (float64 for float64 x).  No gradient.
  m.def("abs_quantile(Tensor x, float q) -> Tensor");
  // The dead-zone compander of every weight in w (one entry per weight in each
  // list), and the group lasso of the quantized weights:
  // (w_hat[], gl_loss, scalars[], norms[]) with scalars[l] = [a, B, d, Q, s,
  // delta] in the compute dtype, gl_loss = sum_l gl_lambda[l] * sum_j
  // ||w_hat_l[:, j]|| over the layers whose gl_lambda is not 0, and norms[l]
  // their column norms (empty for the others).  Differentiable in w, logit_dz
  // and logit_bit through w_hat and gl_loss.
  m.def(
      "deadzone_forward(Tensor[] w, Tensor[] logit_dz, Tensor[] logit_bit, float[] fixed_bit, float[] min_bits, "
      "float[] max_bits, bool[] learnable_bit, float[] gl_lambda) -> (Tensor[], Tensor, Tensor[], Tensor[])");
  // Its backward, one pass per layer: the group lasso's gradient
  // gl_grad * lambda * w_hat / ||w_hat[:, j]|| added to grad[l], then the
  // dead-zone backward.  (dL/dw[], dL/dlogit_dz[], dL/dlogit_bit[]).
  m.def(
      "deadzone_backward(Tensor[] grad, Tensor gl_grad, Tensor[] w, Tensor[] w_hat, Tensor[] scalars, "
      "Tensor[] norms, Tensor[] logit_dz, Tensor[] logit_bit, float[] min_bits, float[] max_bits, "
      "bool[] learnable_bit, float[] gl_lambda) -> (Tensor[], Tensor[], Tensor[])");
  // Uniform symmetric quantizer: (w_hat, [a, s]).  Differentiable in w.
  m.def("uniform_forward(Tensor w, int bitwidth) -> (Tensor, Tensor)");
  m.def("uniform_backward(Tensor grad, Tensor w, Tensor scale, int bitwidth) -> Tensor");
  // Group lasso over many layers: (sum_l lambdas[l] * sum_j ||W_l[:, j]||, the
  // column norms of each layer).  Differentiable in the weights.
  m.def("group_lasso_forward(Tensor[] weights, float[] lambdas) -> (Tensor, Tensor[])");
  m.def("group_lasso_backward(Tensor grad, Tensor[] weights, Tensor[] norms, float[] lambdas) -> Tensor[]");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
#ifdef CODEQ_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["cuda_archs"] = std::string(CODEQ_CUDA_ARCHS);
#ifdef CODEQ_TORCH_VERSION
  d["torch_built_with"] = std::string(CODEQ_TORCH_VERSION);
#endif
#ifdef CODEQ_SOURCE_DIGEST
  d["source_digest"] = std::string(CODEQ_SOURCE_DIGEST);  // of csrc/, codeq/_digest.py
#endif
  d["openmp"] =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "codeq fused kernels (ops are registered under torch.ops.codeq)";
  m.def("build_info", &build_info, "What this extension was built with");
  m.def(
      "quantile_hint_stats",
      [] {
        auto& h = codeq::cpu::quantile_hints();
        std::lock_guard<std::mutex> lock(h.mutex);
        return std::make_pair(h.hits, h.misses);
      },
      "(hits, misses) of the CPU quantile's window around its previous answer in this process");
  m.def(
      "quantile_hints_clear",
      [] {
        auto& h = codeq::cpu::quantile_hints();
        std::lock_guard<std::mutex> lock(h.mutex);
        h.map.clear();
      },
      "Forget the CPU quantile's previous answers (its next calls take the radix select)");
}
