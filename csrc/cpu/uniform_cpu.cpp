// CPU kernels of the uniform symmetric quantizer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "codeq/ops.h"
#include "codeq/select.h"
#include "codeq/uniform.h"
#include "cpu/simd.h"

namespace codeq {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void forward_loop(const scalar_t* __restrict w, scalar_t* __restrict out, int64_t b, int64_t e, CT a,
                                   CT s, CT Q) {
  for (int64_t i = b; i < e; ++i) out[i] = static_cast<scalar_t>(uniform::forward_element<CT>(static_cast<CT>(w[i]), a, s, Q));
}

template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES void backward_loop(const scalar_t* __restrict g, const scalar_t* __restrict w,
                                    scalar_t* __restrict out, int64_t b, int64_t e, CT a, CT s, CT Q) {
  for (int64_t i = b; i < e; ++i)
    out[i] = static_cast<scalar_t>(uniform::backward_element<CT>(static_cast<CT>(g[i]), static_cast<CT>(w[i]), a, s, Q));
}

// max|x| with NaN as the largest value (torch.amax propagates NaN).
template <typename scalar_t, typename CT>
CT abs_max(const scalar_t* p, int64_t n) {
  using Key = typename select::KeyTraits<CT>::Key;
  const int64_t nchunks = std::max<int64_t>(1, (n + kGrain - 1) / kGrain);
  std::vector<Key> part(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kGrain, e = std::min(n, b + kGrain);
      Key m = 0;
      for (int64_t i = b; i < e; ++i) m = std::max(m, select::abs_key<CT>(static_cast<CT>(p[i])));
      part[c] = m;
    }
  });
  return select::key_value<CT>(*std::max_element(part.begin(), part.end()));
}

std::tuple<at::Tensor, at::Tensor> uniform_forward_cpu(const at::Tensor& w, int64_t bitwidth) {
  check_uniform_inputs(w, bitwidth);
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.numel();
  at::Tensor out = at::empty_like(wc);
  at::Tensor scale;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_uniform_forward", [&] {
    using CT = typename AccType<scalar_t>::type;
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const CT a = abs_max<scalar_t, CT>(wp, n);
    const CT Q = uniform::levels<CT>(bitwidth);
    const CT s = a / Q;
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { forward_loop<scalar_t, CT>(wp, op, b, e, a, s, Q); });
    scale = at::empty({2}, wc.options().dtype(c10::CppTypeToScalarType<CT>::value));
    scale.mutable_data_ptr<CT>()[0] = a;
    scale.mutable_data_ptr<CT>()[1] = s;
  });
  return {out, scale};
}

at::Tensor uniform_backward_cpu(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
                                int64_t bitwidth) {
  check_uniform_backward_inputs(grad, w, scale, bitwidth);
  const at::Tensor wc = w.contiguous(), gc = grad.contiguous(), sc = scale.contiguous();
  const int64_t n = wc.numel();
  at::Tensor out = at::empty_like(wc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "codeq_uniform_backward", [&] {
    using CT = typename AccType<scalar_t>::type;
    const CT a = sc.const_data_ptr<CT>()[0], s = sc.const_data_ptr<CT>()[1];
    const CT Q = uniform::levels<CT>(bitwidth);
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { backward_loop<scalar_t, CT>(gp, wp, op, b, e, a, s, Q); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CPU, m) {
  m.impl("uniform_forward", &uniform_forward_cpu);
  m.impl("uniform_backward", &uniform_backward_cpu);
}

}  // namespace cpu
}  // namespace codeq
