// Operator schemas of the codeq namespace and the Python module codeq._C.
//
// The schemas are defined here, once; each backend registers its kernels in
// its own file (csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL(codeq, CPU, ...),
// csrc/cuda/*.cu with TORCH_LIBRARY_IMPL(codeq, CUDA, ...)).  Fake (meta)
// kernels and most autograd live in codeq/ops.py; csrc/autograd.cpp holds the
// C++ autograd node of deadzone_multi.
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
  // dtype float32 (float64 for float64 x).
  m.def("abs_quantile(Tensor x, float q) -> Tensor");
  // Dead-zone compander forward: returns (w_hat, scalars) with
  // scalars = [a, B, d, Q, s, delta] in the compute dtype.
  m.def(
      "deadzone_forward(Tensor w, Tensor logit_dz, Tensor logit_bit, float fixed_bit, float min_bits, "
      "float max_bits, bool learnable_bit) -> (Tensor, Tensor)");
  // Backward: (dL/dw, dL/dlogit_dz, dL/dlogit_bit) in one pass over w.
  m.def(
      "deadzone_backward(Tensor grad, Tensor w, Tensor scalars, Tensor logit_dz, Tensor logit_bit, "
      "float min_bits, float max_bits, bool learnable_bit) -> (Tensor, Tensor, Tensor)");
  // Uniform symmetric quantizer: returns (w_hat, [a, s]).
  m.def("uniform_forward(Tensor w, int bitwidth) -> (Tensor, Tensor)");
  m.def("uniform_backward(Tensor grad, Tensor w, Tensor scale, int bitwidth) -> Tensor");
  // Group lasso over many layers at once: (sum_l lambda_l * sum_j ||W_l[:, j]||, column norms per layer).
  m.def("group_lasso_forward(Tensor[] weights, float[] lambdas) -> (Tensor, Tensor[])");
  m.def("group_lasso_backward(Tensor grad, Tensor[] weights, Tensor[] norms, float[] lambdas) -> Tensor[]");
  // Many dead-zone quantizers in one call (csrc/multi.cpp), with the group
  // lasso of their outputs: (w_hat[], scalars[], norms[], gl_loss), where
  // gl_loss = sum_l gl_lambda[l] * sum_j ||w_hat_l[:, j]|| over the layers with
  // gl_lambda[l] != 0 (norms[l] is empty for the others).
  m.def(
      "deadzone_forward_multi(Tensor[] w, Tensor[] logit_dz, Tensor[] logit_bit, float[] fixed_bit, "
      "float[] min_bits, float[] max_bits, bool[] learnable_bit, float[] gl_lambda) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor)");
  // The same, composed of deadzone_forward + group_lasso_forward (the CUDA
  // kernel of deadzone_forward_multi; the CPU oracle of the fused one).
  m.def(
      "deadzone_forward_multi_unfused(Tensor[] w, Tensor[] logit_dz, Tensor[] logit_bit, float[] fixed_bit, "
      "float[] min_bits, float[] max_bits, bool[] learnable_bit, float[] gl_lambda) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor)");
  // deadzone_forward_multi with autograd (csrc/autograd.cpp, a C++ node):
  // (w_hat[], gl_loss, scalars[], norms[]); gradients flow into w, logit_dz and
  // logit_bit from w_hat and gl_loss.  The eager training fast path uses it.
  m.def(
      "deadzone_multi(Tensor[] w, Tensor[] logit_dz, Tensor[] logit_bit, float[] fixed_bit, float[] min_bits, "
      "float[] max_bits, bool[] learnable_bit, float[] gl_lambda) -> (Tensor[], Tensor, Tensor[], Tensor[])");
  // Its backward: the group-lasso gradient (gl_grad * lambda * w_hat / norm) is
  // added to grad[l] and the dead-zone backward applied, layer by layer; the CPU
  // kernel fuses the two.  Returns (dL/dw[], dL/dlogit_dz[], dL/dlogit_bit[]).
  m.def(
      "deadzone_backward_multi(Tensor[] grad, Tensor gl_grad, Tensor[] w, Tensor[] w_hat, Tensor[] scalars, "
      "Tensor[] norms, Tensor[] logit_dz, Tensor[] logit_bit, float[] min_bits, float[] max_bits, "
      "bool[] learnable_bit, float[] gl_lambda) -> (Tensor[], Tensor[], Tensor[])");
  // The same, composed of group_lasso_backward + add + deadzone_backward (the
  // CUDA kernel of deadzone_backward_multi; the CPU oracle of the fused one).
  m.def(
      "deadzone_backward_multi_unfused(Tensor[] grad, Tensor gl_grad, Tensor[] w, Tensor[] w_hat, "
      "Tensor[] scalars, Tensor[] norms, Tensor[] logit_dz, Tensor[] logit_bit, float[] min_bits, "
      "float[] max_bits, bool[] learnable_bit, float[] gl_lambda) -> (Tensor[], Tensor[], Tensor[])");
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
        std::lock_guard<std::mutex> lock(codeq::cpu::hint_mutex());
        const auto& st = codeq::cpu::hint_stats();
        return std::make_pair(st.hits, st.misses);
      },
      "(hits, misses) of the CPU quantile's previous-result hints in this process");
}
