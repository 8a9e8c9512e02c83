// CUDA kernels of the exact q-quantile of |x| (codeq::abs_quantile) and the
// selection + scalars part of codeq::deadzone_forward (see quantile_cuda.cuh
// for the launch structure).
//
// Exactness: the selection works on the order-preserving integer keys of
// codeq/select.h (|x| ascending, every NaN above +Inf), so it is a pure
// integer computation; the rank, the interpolation weight and the lerp are
// dz::quantile_rank and dz::lerp, the very functions of the CPU op.  The
// result is therefore bitwise equal to the CPU op (and to torch.quantile).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <climits>

#include "codeq/ops.h"
#include "codeq/select.h"
#include "cuda/quantile_cuda.cuh"

namespace codeq {
namespace cuda {
namespace {

constexpr int kSmallThreads = 512;  // the single-block path
constexpr int kPassThreads = 512;   // the grid passes
constexpr int kUnroll = 4;          // 16-byte vectors in flight per thread

template <typename CT>
using KeyOf = typename select::KeyTraits<CT>::Key;

// Workspace of the multi-block path (zeroed by one cudaMemsetAsync).
template <typename CT>
struct SelectWs {
  unsigned long long hist[select::Radix<CT>::kPasses][select::kDigitBins];  // global histogram of each pass
  unsigned int done[select::Radix<CT>::kPasses];                             // ticket counter of each pass
  unsigned int nan;                                                          // any NaN key seen
  unsigned long long inv_min_above;  // ~(smallest key above the last group); 0 = none
  unsigned long long prefix;         // key bits chosen so far (written by the last block of a pass)
  long long rank;                    // rank of lo within the group of prefix
};

// 64-bit views of the keys for the atomics / cache-global loads.
template <typename Key>
__device__ __forceinline__ unsigned long long key_u64(Key k) {
  return static_cast<unsigned long long>(k);
}

// Result of the block-wide digit pick.
struct Pick {
  int digit;                 // the digit whose bin holds `rank`
  unsigned long long cum;    // number of group keys in the lower digits
  unsigned long long count;  // number of group keys with this digit
  int next;                  // next non-empty digit above `digit` (-1: none; only when asked)
};

// Finds, in a histogram of kDigitBins counts, the digit whose bin holds rank
// `rank` (0-based): an exclusive scan over the threads' contiguous bins.
template <int NT>
struct BlockPick {
  static_assert(select::kDigitBins % NT == 0, "bins must split evenly over the threads");
  static constexpr int kPer = select::kDigitBins / NT;
  using Scan = cub::BlockScan<unsigned long long, NT>;
  using Red = cub::BlockReduce<int, NT>;
  struct Storage {
    union {
      typename Scan::TempStorage scan;
      typename Red::TempStorage red;
    } u;
    int digit;
    unsigned long long cum, count;
    int next;
  };

  template <typename Load>
  __device__ static Pick run(Storage& st, Load load, long long rank, bool want_next) {
    unsigned long long c[kPer];
    unsigned long long local = 0;
    const int base = static_cast<int>(threadIdx.x) * kPer;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      c[k] = load(base + k);
      local += c[k];
    }
    if (threadIdx.x == 0) {  // defaults: never read uninitialised memory, even for inconsistent counts
      st.digit = 0;
      st.cum = 0;
      st.count = 0;
      st.next = -1;
    }
    __syncthreads();
    unsigned long long start;
    Scan(st.u.scan).ExclusiveSum(local, start);
    const unsigned long long r = static_cast<unsigned long long>(rank);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if (c[k] > 0 && start <= r && r < start + c[k]) {  // exactly one thread, one k
        st.digit = base + k;
        st.cum = start;
        st.count = c[k];
      }
      start += c[k];
    }
    __syncthreads();
    if (want_next) {
      const int d = st.digit;
      int nx = INT_MAX;
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        if (base + k > d && c[k] > 0 && base + k < nx) nx = base + k;
      const int m = Red(st.u.red).Reduce(nx, MinOp());
      if (threadIdx.x == 0) st.next = m == INT_MAX ? -1 : m;
      __syncthreads();
    }
    Pick p{st.digit, st.cum, st.count, st.next};
    __syncthreads();  // the storage may be reused after this
    return p;
  }
};

// Writes the result of the selection (thread-level).  sc3 (shared memory of
// the single-block path, may be null) receives s, delta, Q for the fused
// quantization.
template <typename CT>
__device__ __forceinline__ void finalize(CT a, const SelectOut<CT>& out, CT* sc3) {
  if (out.quantile != nullptr) *out.quantile = a;
  if (out.scalars != nullptr) {
    const dz::Scalars<CT> sc = device_scalars<CT>(a, out.cfg);
    out.scalars[dz::kA] = sc.a;
    out.scalars[dz::kB] = sc.B;
    out.scalars[dz::kD] = sc.d;
    out.scalars[dz::kQ] = sc.Q;
    out.scalars[dz::kS] = sc.s;
    out.scalars[dz::kDelta] = sc.delta;
    if (sc3 != nullptr) {
      sc3[0] = sc.s;
      sc3[1] = sc.delta;
      sc3[2] = sc.Q;
    }
  }
}

template <typename CT>
__device__ __forceinline__ CT quantile_value(bool any_nan, KeyOf<CT> k_lo, KeyOf<CT> k_hi, CT weight) {
  if (any_nan) {  // the quiet NaN (torch.quantile: any NaN -> NaN)
    constexpr int kMant = sizeof(CT) == 4 ? 23 : 52;
    return select::key_value<CT>(select::KeyTraits<CT>::kInf | (KeyOf<CT>(1) << (kMant - 1)));
  }
  return dz::lerp<CT>(select::key_value<CT>(k_lo), select::key_value<CT>(k_hi), weight);
}

// ------------------------------------------------------ single-block path --
// One block does every digit pass over x (L1/L2 resident at these sizes),
// computes a and the scalars, and (w_hat != nullptr) quantizes.
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads)
    select_small_kernel(const scalar_t* __restrict__ x, int64_t n, bool aligned, int64_t rank_lo, bool same_rank,
                        typename AccType<scalar_t>::type weight, SelectOut<typename AccType<scalar_t>::type> out,
                        scalar_t* __restrict__ w_hat, bool out_aligned) {
  using CT = typename AccType<scalar_t>::type;
  using R = select::Radix<CT>;
  using Key = KeyOf<CT>;
  using Pk = BlockPick<kSmallThreads>;
  using MinRed = cub::BlockReduce<Key, kSmallThreads>;
  __shared__ unsigned int hist[select::kDigitBins];
  __shared__ union {
    typename Pk::Storage pick;
    typename MinRed::TempStorage red;
  } tmp;
  __shared__ CT sc3[3];

  Key prefix = 0;
  long long rank = rank_lo;
  bool nan = false;
  Key min_above = ~Key(0);
  Pick pk{0, 0, 0, -1};
  for (int p = 0; p < R::kPasses; ++p) {
    for (int b = threadIdx.x; b < select::kDigitBins; b += kSmallThreads) hist[b] = 0;
    __syncthreads();
    const int hi = R::pass_hi_bit(p);
    const bool first = p == 0, last = p == R::kPasses - 1;
    visit<scalar_t, kUnroll>(x, n, aligned, threadIdx.x, kSmallThreads, [&](CT v) {
      const Key k = select::abs_key<CT>(v);
      if (first) nan |= select::key_is_nan<CT>(k);
      if (last && R::above_group(k, prefix, hi) && k < min_above) min_above = k;
      warp_hist_add(hist, R::in_group(k, prefix, hi) ? R::digit(k, p) : -1);
    });
    __syncthreads();
    pk = Pk::run(tmp.pick, [&](int b) { return static_cast<unsigned long long>(hist[b]); }, rank, last);
    prefix = R::with_digit(prefix, p, pk.digit);
    rank -= static_cast<long long>(pk.cum);
  }
  const bool any_nan = __syncthreads_or(nan) != 0;
  const Key mn = MinRed(tmp.red).Reduce(min_above, MinOp());
  if (threadIdx.x == 0) {
    const Key k_hi = select::resolve_hi<CT>(prefix, same_rank, rank, static_cast<int64_t>(pk.count), pk.next, mn);
    finalize<CT>(quantile_value<CT>(any_nan, prefix, k_hi, weight), out, sc3);
  }
  if (w_hat == nullptr) return;  // uniform across the block
  __syncthreads();
  const CT s = sc3[0], delta = sc3[1], Q = sc3[2];
  map_unary<scalar_t>(x, w_hat, n, aligned && out_aligned, threadIdx.x, kSmallThreads,
                      [&](CT v) { return dz::forward_element<CT>(v, s, delta, Q); });
}

// ------------------------------------------------------ multi-block path --
// One launch per digit pass.  Every block histograms its share of the group
// in shared memory and adds it to the pass's global histogram; the last block
// to finish picks the digit (and after the last pass writes the result).
template <typename scalar_t>
__global__ void __launch_bounds__(kPassThreads)
    select_pass_kernel(const scalar_t* __restrict__ x, int64_t n, bool aligned, int p, int64_t rank_lo,
                       bool same_rank, typename AccType<scalar_t>::type weight,
                       SelectWs<typename AccType<scalar_t>::type>* __restrict__ ws,
                       SelectOut<typename AccType<scalar_t>::type> out) {
  using CT = typename AccType<scalar_t>::type;
  using R = select::Radix<CT>;
  using Key = KeyOf<CT>;
  using Pk = BlockPick<kPassThreads>;
  using MinRed = cub::BlockReduce<Key, kPassThreads>;
  __shared__ unsigned int hist[select::kDigitBins];
  __shared__ union {
    typename Pk::Storage pick;
    typename MinRed::TempStorage red;
  } tmp;
  __shared__ bool s_last;

  for (int b = threadIdx.x; b < select::kDigitBins; b += kPassThreads) hist[b] = 0;
  const Key prefix = p == 0 ? Key(0) : static_cast<Key>(ws->prefix);  // written by the previous launch
  const int hi = R::pass_hi_bit(p);
  const bool first = p == 0, last = p == R::kPasses - 1;
  __syncthreads();

  bool nan = false;
  Key min_above = ~Key(0);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kPassThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kPassThreads;
  visit<scalar_t, kUnroll>(x, n, aligned, tid, nthreads, [&](CT v) {
    const Key k = select::abs_key<CT>(v);
    if (first) nan |= select::key_is_nan<CT>(k);
    if (last && R::above_group(k, prefix, hi) && k < min_above) min_above = k;
    warp_hist_add(hist, R::in_group(k, prefix, hi) ? R::digit(k, p) : -1);
  });
  __syncthreads();
  for (int b = threadIdx.x; b < select::kDigitBins; b += kPassThreads) {
    const unsigned int c = hist[b];
    if (c != 0) atomicAdd(&ws->hist[p][b], static_cast<unsigned long long>(c));
  }
  if (first) {
    if (__syncthreads_or(nan) && threadIdx.x == 0) atomicOr(&ws->nan, 1u);
  }
  if (last) {
    const Key mn = MinRed(tmp.red).Reduce(min_above, MinOp());
    if (threadIdx.x == 0 && mn != ~Key(0)) atomicMax(&ws->inv_min_above, ~key_u64(mn));
  }
  // Ticket: the last block of the grid sees every block's histogram.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(&ws->done[p], 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();

  const long long rank = p == 0 ? static_cast<long long>(rank_lo) : __ldcg(&ws->rank);
  const unsigned long long* h = ws->hist[p];
  const Pick pk = Pk::run(tmp.pick, [&](int b) { return __ldcg(h + b); }, rank, last);
  if (threadIdx.x == 0) {
    const Key np = R::with_digit(prefix, p, pk.digit);
    const long long nr = rank - static_cast<long long>(pk.cum);
    ws->prefix = key_u64(np);
    ws->rank = nr;
    if (last) {
      const bool any_nan = __ldcg(&ws->nan) != 0u;
      const unsigned long long inv = __ldcg(&ws->inv_min_above);
      const Key mn = inv == 0ull ? ~Key(0) : static_cast<Key>(~inv);
      const Key k_hi = select::resolve_hi<CT>(np, same_rank, nr, static_cast<int64_t>(pk.count), pk.next, mn);
      finalize<CT>(quantile_value<CT>(any_nan, np, k_hi, weight), out, nullptr);
    }
  }
}

// ----------------------------------------------------------------- the op --
at::Tensor abs_quantile_cuda(const at::Tensor& x, double q) {
  check_float_tensor(x, "abs_quantile", "x");
  TORCH_CHECK(x.is_cuda(), "codeq.abs_quantile: x must be a CUDA tensor");
  TORCH_CHECK(x.numel() > 0, "codeq.abs_quantile: got an empty tensor");
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "codeq.abs_quantile: q must lie in [0, 1], got ", q);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "codeq_abs_quantile_cuda", [&] {
    using CT = typename AccType<scalar_t>::type;
    out = at::empty({}, xc.options().dtype(c10::CppTypeToScalarType<CT>::value));
    SelectOut<CT> so;
    so.quantile = out.mutable_data_ptr<CT>();
    launch_abs_select<scalar_t>(xc.const_data_ptr<scalar_t>(), xc.numel(), q, so, nullptr, xc, stream);
  });
  return out;
}

}  // namespace

template <typename scalar_t>
bool launch_abs_select(const scalar_t* x, int64_t n, double q, const SelectOut<typename AccType<scalar_t>::type>& out,
                       scalar_t* w_hat, const at::Tensor& like, cudaStream_t stream) {
  using CT = typename AccType<scalar_t>::type;
  using R = select::Radix<CT>;
  const auto rk = dz::quantile_rank<CT>(n, q);
  const bool same_rank = rk.hi == rk.lo;
  const bool x_aligned = aligned16(x);
  if (n <= kSmallN) {
    scalar_t* wh = out.scalars != nullptr ? w_hat : nullptr;
    select_small_kernel<scalar_t><<<1, kSmallThreads, 0, stream>>>(x, n, x_aligned, rk.lo, same_rank, rk.weight, out,
                                                                   wh, wh != nullptr && aligned16(wh));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return wh != nullptr;
  }
  const at::Tensor ws = zeroed_workspace(static_cast<int64_t>(sizeof(SelectWs<CT>)), like, stream);
  auto* wsp = reinterpret_cast<SelectWs<CT>*>(ws.data_ptr());
  constexpr int V = VecTraits<scalar_t>::kVec;
  const int64_t cap = 2 * static_cast<int64_t>(sm_count(like.get_device()));
  const int blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap, ceil_div(n, int64_t(kPassThreads) * V * kUnroll))));
  for (int p = 0; p < R::kPasses; ++p) {
    select_pass_kernel<scalar_t><<<blocks, kPassThreads, 0, stream>>>(x, n, x_aligned, p, rk.lo, same_rank,
                                                                      rk.weight, wsp, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return false;
}

template bool launch_abs_select<float>(const float*, int64_t, double, const SelectOut<float>&, float*,
                                       const at::Tensor&, cudaStream_t);
template bool launch_abs_select<double>(const double*, int64_t, double, const SelectOut<double>&, double*,
                                        const at::Tensor&, cudaStream_t);
template bool launch_abs_select<c10::Half>(const c10::Half*, int64_t, double, const SelectOut<float>&, c10::Half*,
                                           const at::Tensor&, cudaStream_t);
template bool launch_abs_select<c10::BFloat16>(const c10::BFloat16*, int64_t, double, const SelectOut<float>&,
                                               c10::BFloat16*, const at::Tensor&, cudaStream_t);

TORCH_LIBRARY_IMPL(codeq, CUDA, m) { m.impl("abs_quantile", &abs_quantile_cuda); }

}  // namespace cuda
}  // namespace codeq
