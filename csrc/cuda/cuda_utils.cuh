// Small helpers shared by the CUDA kernels of codeq (device code + host glue).
//
// Only c10/cuda headers are used: ATen/cuda/CUDAContext.h pulls in cusparse.h,
// which is not on every machine's include path.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "codeq/common.h"

namespace codeq {
namespace cuda {

// 16-byte vector of storage elements: 4 float, 2 double, 8 half / bfloat16.
template <typename scalar_t>
struct VecTraits {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));
};

template <typename scalar_t>
struct alignas(16) Vec {
  scalar_t v[VecTraits<scalar_t>::kVec];
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Histogram increment that combines the lanes of a warp that hit the same bin
// (a constant tensor would otherwise serialise every shared-memory atomic on
// one address).  bin < 0: this lane adds nothing.  Must be reached by every
// lane that is converged here (it uses __activemask()).
__device__ __forceinline__ void warp_hist_add(unsigned int* hist, int bin) {
  const unsigned int active = __activemask();
  const unsigned int peers = __match_any_sync(active, bin);
  const int leader = __ffs(peers) - 1;
  if (bin >= 0 && static_cast<int>(threadIdx.x & 31) == leader) atomicAdd(hist + bin, __popc(peers));
}

struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return b < a ? b : a;
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a < b ? b : a;
  }
};

// ------------------------------------------------------- element loops --
// Every loop below is a grid-stride loop over int64 indices: thread `tid` of
// `nthreads` visits a fixed set of elements in a fixed order (what makes the
// per-thread partial sums of the backward deterministic).  With `aligned`
// (all pointers 16-byte aligned) it moves 16-byte vectors, UNROLL of them in
// flight per thread; the (< one vector) tail and misaligned tensors go
// element by element.

// f(CT x) for every element of x.
template <typename scalar_t, int UNROLL, typename F>
__device__ __forceinline__ void visit(const scalar_t* __restrict__ x, int64_t n, bool aligned, int64_t tid,
                                      int64_t nthreads, F&& f) {
  using CT = typename AccType<scalar_t>::type;
  constexpr int V = VecTraits<scalar_t>::kVec;
  int64_t i0 = 0;
  if (aligned) {
    const int64_t nvec = n / V;
    const Vec<scalar_t>* xv = reinterpret_cast<const Vec<scalar_t>*>(x);
    int64_t j = tid;
    for (; j + (UNROLL - 1) * nthreads < nvec; j += UNROLL * nthreads) {
      Vec<scalar_t> buf[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) buf[u] = xv[j + u * nthreads];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int e = 0; e < V; ++e) f(static_cast<CT>(buf[u].v[e]));
    }
    for (; j < nvec; j += nthreads) {
      const Vec<scalar_t> b = xv[j];
#pragma unroll
      for (int e = 0; e < V; ++e) f(static_cast<CT>(b.v[e]));
    }
    i0 = nvec * V;
  }
  for (int64_t i = i0 + tid; i < n; i += nthreads) f(static_cast<CT>(x[i]));
}

// y = f(x) element-wise (f: CT -> CT).
template <typename scalar_t, typename F>
__device__ __forceinline__ void map_unary(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n,
                                          bool aligned, int64_t tid, int64_t nthreads, F&& f) {
  using CT = typename AccType<scalar_t>::type;
  constexpr int V = VecTraits<scalar_t>::kVec;
  int64_t i0 = 0;
  if (aligned) {
    const int64_t nvec = n / V;
    const Vec<scalar_t>* xv = reinterpret_cast<const Vec<scalar_t>*>(x);
    Vec<scalar_t>* yv = reinterpret_cast<Vec<scalar_t>*>(y);
    for (int64_t j = tid; j < nvec; j += nthreads) {
      const Vec<scalar_t> a = xv[j];
      Vec<scalar_t> b;
#pragma unroll
      for (int e = 0; e < V; ++e) b.v[e] = static_cast<scalar_t>(f(static_cast<CT>(a.v[e])));
      yv[j] = b;
    }
    i0 = nvec * V;
  }
  for (int64_t i = i0 + tid; i < n; i += nthreads) y[i] = static_cast<scalar_t>(f(static_cast<CT>(x[i])));
}

// y = f(g, x) element-wise (f: (CT, CT) -> CT), in index order per thread.
template <typename scalar_t, typename F>
__device__ __forceinline__ void map_binary(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                           scalar_t* __restrict__ y, int64_t n, bool aligned, int64_t tid,
                                           int64_t nthreads, F&& f) {
  using CT = typename AccType<scalar_t>::type;
  constexpr int V = VecTraits<scalar_t>::kVec;
  int64_t i0 = 0;
  if (aligned) {
    const int64_t nvec = n / V;
    const Vec<scalar_t>* gv = reinterpret_cast<const Vec<scalar_t>*>(g);
    const Vec<scalar_t>* xv = reinterpret_cast<const Vec<scalar_t>*>(x);
    Vec<scalar_t>* yv = reinterpret_cast<Vec<scalar_t>*>(y);
    for (int64_t j = tid; j < nvec; j += nthreads) {
      const Vec<scalar_t> a = gv[j];
      const Vec<scalar_t> b = xv[j];
      Vec<scalar_t> c;
      if constexpr (sizeof(scalar_t) == 4) {
        // float: a rolled loop keeps fewer values live across the slow-path
        // subroutine of the IEEE division, which otherwise spills on sm_90.
#pragma unroll 1
        for (int e = 0; e < V; ++e)
          c.v[e] = static_cast<scalar_t>(f(static_cast<CT>(a.v[e]), static_cast<CT>(b.v[e])));
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e)
          c.v[e] = static_cast<scalar_t>(f(static_cast<CT>(a.v[e]), static_cast<CT>(b.v[e])));
      }
      yv[j] = c;
    }
    i0 = nvec * V;
  }
  for (int64_t i = i0 + tid; i < n; i += nthreads)
    y[i] = static_cast<scalar_t>(f(static_cast<CT>(g[i]), static_cast<CT>(x[i])));
}

// Grid of an element-wise kernel: enough blocks to cover n with one vector
// per thread, at most `cap` (a constant, so that the partition of the
// elements, and with it every partial sum, depends on n only).
inline int elementwise_blocks(int64_t n, int threads, int vec, int64_t cap) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cap, ceil_div(n, int64_t(threads) * vec))));
}

inline int sm_count(int device) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device] = v;
  return std::max(v, 1);
}

// Zero-initialised scratch memory on the current stream (caching allocator +
// one cudaMemsetAsync; no host synchronisation).
inline at::Tensor zeroed_workspace(int64_t bytes, const at::Tensor& like, cudaStream_t stream) {
  at::Tensor ws = at::empty({std::max<int64_t>(bytes, 16)}, like.options().dtype(at::kByte));
  C10_CUDA_CHECK(cudaMemsetAsync(ws.data_ptr(), 0, static_cast<size_t>(ws.numel()), stream));
  return ws;
}

inline void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "codeq.", op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), "codeq.", op, ": ", name, " is on ", t.device(), " but the weight is on ",
              ref.device());
}

}  // namespace cuda
}  // namespace codeq
