// Device-side exact quantile of |x| (radix select over the order-preserving
// keys of codeq/select.h), shared by the abs_quantile and deadzone_forward CUDA
// ops.  The kernels live in quantile_cuda.cu (instantiated once for the four
// dtypes); this header declares the host launcher and the small device
// helpers that the dead-zone kernels reuse (reading the logits, the scalars).
//
// Launch structure of launch_abs_select (no host synchronisation anywhere):
//   n <= kSmallN : ONE kernel, one block of 512 threads: the digit passes with
//                  a shared-memory histogram, the scalars (thread 0) and, for
//                  deadzone_forward, the quantization of w.
//   n >  kSmallN : cudaMemsetAsync of a small workspace, then one grid kernel
//                  per digit pass (3 for float keys, 6 for double): block
//                  histograms in shared memory, merged into a global one with
//                  integer atomics; the last block to finish (threadfence +
//                  ticket counter) picks the digit, and after the last pass
//                  computes a and the scalars.  The dead-zone op then runs its
//                  element-wise kernel.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "codeq/deadzone.h"
#include "cuda/cuda_utils.cuh"

namespace codeq {
namespace cuda {

constexpr int64_t kSmallN = int64_t(1) << 16;  // single-block select up to this many elements

// What the dead-zone compander needs besides w (the logits stay on the device).
struct DzCfg {
  const void* logit_dz = nullptr;   // 0-dim, float32 (or float64 with float64 weights)
  const void* logit_bit = nullptr;
  bool logits_double = false;
  bool learnable_bit = false;
  double fixed_bit = 4, min_bits = 2, max_bits = 8;
};

template <typename TH>
__device__ __forceinline__ TH load_logit(const void* p) {
  return *static_cast<const TH*>(p);
}

// dz::compute_scalars with the logits read on the device (thread-level).
template <typename CT>
__device__ __forceinline__ dz::Scalars<CT> device_scalars(CT a, const DzCfg& c) {
  if (c.logits_double) {
    return dz::compute_scalars<CT, double>(a, load_logit<double>(c.logit_dz), load_logit<double>(c.logit_bit),
                                           c.learnable_bit, c.fixed_bit, c.min_bits, c.max_bits);
  }
  return dz::compute_scalars<CT, float>(a, load_logit<float>(c.logit_dz), load_logit<float>(c.logit_bit),
                                        c.learnable_bit, static_cast<float>(c.fixed_bit),
                                        static_cast<float>(c.min_bits), static_cast<float>(c.max_bits));
}

// Where the selection puts its result.
template <typename CT>
struct SelectOut {
  CT* quantile = nullptr;  // abs_quantile: the 0-dim result
  CT* scalars = nullptr;   // deadzone_forward: [a, B, d, Q, s, delta]
  DzCfg cfg;
};

// Launches the selection of the q-quantile of |x| (x contiguous, n > 0) on
// `stream`.  For deadzone_forward (out.scalars set) with n <= kSmallN it also
// writes w_hat (when w_hat != nullptr) and returns true; otherwise the caller
// runs its own element-wise kernel after it (same stream) and it returns false.
// `like` supplies the device/options of the workspace.
template <typename scalar_t>
bool launch_abs_select(const scalar_t* x, int64_t n, double q, const SelectOut<typename AccType<scalar_t>::type>& out,
                       scalar_t* w_hat, const at::Tensor& like, cudaStream_t stream);

}  // namespace cuda
}  // namespace codeq
