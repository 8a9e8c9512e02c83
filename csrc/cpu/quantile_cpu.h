// Exact q-quantile of |x| on the CPU in O(n): a radix select over the
// order-preserving keys of codeq/select.h.
//
//   pass 1 (parallel): histogram of the top kBits1 key bits (an L1-resident
//           table, kCopies interleaved copies so that runs of equal bins do not
//           serialise on one counter);
//   pass 2 (parallel): gather the keys of the one or two bins holding ranks lo
//           and lo+1;
//   then, in memory, narrow the candidates with further 8-bit radix passes
//   until few are left, and nth_element.
// Bitwise equal to sorting |x| (ties and the lerp included).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/select.h"
#include "cpu/scratch.h"
#include "cpu/simd.h"

namespace codeq {
namespace cpu {

constexpr int kBits1 = 11;  // first pass: sign-cleared exponent + top mantissa bits
constexpr int kBins1 = 1 << kBits1;
constexpr int kCopies = 4;

template <typename CT>
constexpr int key_shift1() {
  return select::KeyTraits<CT>::kBits - 1 - kBits1;
}

// Pass 1 over [b, e): counts per bin in hist[kBins1] (summed over kCopies
// interleaved tables); returns true if a NaN was seen.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES bool histogram_pass(const scalar_t* __restrict data, int64_t b, int64_t e, uint32_t* __restrict hist) {
  using Key = typename select::KeyTraits<CT>::Key;
  constexpr int shift = key_shift1<CT>();
  uint32_t tables[kCopies][kBins1] = {};
  Key maxkey = 0;
  int64_t i = b;
  for (; i + kCopies <= e; i += kCopies) {
    for (int c = 0; c < kCopies; ++c) {
      const Key k = select::abs_key<CT>(static_cast<CT>(data[i + c]));
      maxkey = std::max(maxkey, k);
      tables[c][k >> shift]++;
    }
  }
  for (; i < e; ++i) {
    const Key k = select::abs_key<CT>(static_cast<CT>(data[i]));
    maxkey = std::max(maxkey, k);
    tables[0][k >> shift]++;
  }
  for (int bin = 0; bin < kBins1; ++bin) {
    uint32_t s = 0;
    for (int c = 0; c < kCopies; ++c) s += tables[c][bin];
    hist[bin] = s;
  }
  return select::key_is_nan<CT>(maxkey);
}

// One pass over [b, e) for the sampled window [L, U]: counts the keys below L,
// writes the keys inside the window to out[0..cap) and reports a NaN.  Returns
// the count below L; *nout is the number of keys in the window, or -1 if more
// than cap were found (the caller then falls back).
//
// float data (the common case) on x86-64 takes an explicit AVX-512 / AVX2 path
// (picked at run time): 16 / 8 keys per step, the in-window keys compress-stored
// (AVX-512) or visited one per set bit of a mask (AVX2); the compiler does not
// vectorise this loop on its own.  Everything else takes the scalar loop.  The
// paths return the same counts and the same set of keys (order may differ; the
// caller's selection does not depend on it).
template <typename scalar_t, typename CT>
int64_t window_pass_scalar(const scalar_t* __restrict data, int64_t b, int64_t e,
                           typename select::KeyTraits<CT>::Key L, typename select::KeyTraits<CT>::Key U,
                           typename select::KeyTraits<CT>::Key* __restrict out, int64_t cap, int64_t* nout,
                           typename select::KeyTraits<CT>::Key& maxkey) {
  using Key = typename select::KeyTraits<CT>::Key;
  const Key width = U - L;  // k in [L, U]  <=>  k - L <= width (unsigned wrap-around)
  int64_t below = 0, cnt = 0;
  for (int64_t i = b; i < e; ++i) {
    const Key k = select::abs_key<CT>(static_cast<CT>(data[i]));
    maxkey = std::max(maxkey, k);
    below += k < L;
    if (Key(k - L) <= width) {
      if (cnt >= cap) {
        *nout = -1;
        return below;
      }
      out[cnt++] = k;
    }
  }
  *nout = cnt;
  return below;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(CODEQ_NO_CLONES)
#define CODEQ_WINDOW_SIMD 1
// Branch-free: every step compresses the in-window keys to the front of a
// register and stores all 16 lanes at out + cnt (only while that stays inside
// out[0..cap)), so a window that catches a key in one step of five costs no
// mispredicted branches; the count below L is kept per lane.
__attribute__((target("avx512f"))) inline int64_t window_pass_avx512(const float* __restrict data, int64_t b,
                                                                     int64_t e, uint32_t L, uint32_t U,
                                                                     uint32_t* __restrict out, int64_t cap,
                                                                     int64_t* nout, uint32_t& maxkey) {
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __m512i vL = _mm512_set1_epi32(static_cast<int>(L));
  const __m512i vW = _mm512_set1_epi32(static_cast<int>(U - L));
  const __m512i one = _mm512_set1_epi32(1);
  __m512i vmax = _mm512_setzero_si512();
  __m512i vbelow = _mm512_setzero_si512();  // per-lane counts (< 2^31: chunks are < 2^35 keys)
  int64_t cnt = 0;
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    const __m512i k = _mm512_and_si512(_mm512_loadu_si512(data + i), absmask);
    vmax = _mm512_max_epu32(vmax, k);
    vbelow = _mm512_mask_add_epi32(vbelow, _mm512_cmplt_epu32_mask(k, vL), vbelow, one);
    const __mmask16 in = _mm512_cmple_epu32_mask(_mm512_sub_epi32(k, vL), vW);
    if (cnt + 16 > cap) {  // (rare) the window holds more than the caller expected
      *nout = -1;
      return 0;
    }
    _mm512_storeu_si512(out + cnt, _mm512_maskz_compress_epi32(in, k));
    cnt += __builtin_popcount(static_cast<unsigned>(in));
  }
  maxkey = std::max(maxkey, static_cast<uint32_t>(_mm512_reduce_max_epu32(vmax)));
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, vbelow);
  int64_t below = 0;
  for (int j = 0; j < 16; ++j) below += lanes[j];
  int64_t tail = 0;
  below += window_pass_scalar<float, float>(data, i, e, L, U, out + cnt, cap - cnt, &tail, maxkey);
  *nout = tail < 0 ? -1 : cnt + tail;
  return below;
}

__attribute__((target("avx2"))) inline int64_t window_pass_avx2(const float* __restrict data, int64_t b, int64_t e,
                                                               uint32_t L, uint32_t U, uint32_t* __restrict out,
                                                               int64_t cap, int64_t* nout, uint32_t& maxkey) {
  // Keys have the sign bit clear, so signed 32-bit compares order them.
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256i vLm1 = _mm256_set1_epi32(static_cast<int>(L) - 1);  // k >= L  <=>  k > L - 1 (also for L = 0)
  const __m256i vL = _mm256_set1_epi32(static_cast<int>(L));
  const __m256i vU = _mm256_set1_epi32(static_cast<int>(U));
  __m256i vmax = _mm256_setzero_si256();
  __m256i vbelow = _mm256_setzero_si256();  // minus the count, per lane (<= 2^31 / 8 steps per call)
  int64_t cnt = 0;
  int64_t i = b;
  alignas(32) uint32_t keys[8];
  for (; i + 8 <= e; i += 8) {
    const __m256i k = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(data + i)), absmask);
    vmax = _mm256_max_epu32(vmax, k);
    vbelow = _mm256_add_epi32(vbelow, _mm256_cmpgt_epi32(vL, k));
    const __m256i ge = _mm256_cmpgt_epi32(k, vLm1);
    const __m256i gt = _mm256_cmpgt_epi32(k, vU);
    unsigned in = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gt, ge))));
    if (in) {
      if (cnt + 8 > cap) {
        *nout = -1;
        return 0;
      }
      _mm256_store_si256(reinterpret_cast<__m256i*>(keys), k);
      do {
        out[cnt++] = keys[__builtin_ctz(in)];
        in &= in - 1;
      } while (in);
    }
  }
  alignas(32) int32_t lanes[8];
  alignas(32) uint32_t maxes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vbelow);
  _mm256_store_si256(reinterpret_cast<__m256i*>(maxes), vmax);
  int64_t below = 0;
  for (int j = 0; j < 8; ++j) {
    below -= lanes[j];
    maxkey = std::max(maxkey, maxes[j]);
  }
  int64_t tail = 0;
  below += window_pass_scalar<float, float>(data, i, e, L, U, out + cnt, cap - cnt, &tail, maxkey);
  *nout = tail < 0 ? -1 : cnt + tail;
  return below;
}

// 2: AVX-512, 1: AVX2, 0: scalar; the best the CPU has, or at most what
// CODEQ_QUANTILE_SIMD (avx512 / avx2 / none) allows (tests run every path).
inline int window_simd_level() {
  static const int level = [] {
    int l = __builtin_cpu_supports("avx512f") ? 2 : (__builtin_cpu_supports("avx2") ? 1 : 0);
    if (const char* env = std::getenv("CODEQ_QUANTILE_SIMD")) {
      const std::string v(env);
      const int cap = v == "none" ? 0 : (v == "avx2" ? 1 : 2);
      l = std::min(l, cap);
    }
    return l;
  }();
  return level;
}
#endif

template <typename scalar_t, typename CT>
int64_t window_pass(const scalar_t* __restrict data, int64_t b, int64_t e, typename select::KeyTraits<CT>::Key L,
                    typename select::KeyTraits<CT>::Key U, typename select::KeyTraits<CT>::Key* __restrict out,
                    int64_t cap, int64_t* nout, bool& nan) {
  typename select::KeyTraits<CT>::Key maxkey = 0;
  int64_t below;
#ifdef CODEQ_WINDOW_SIMD
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<CT, float>) {
    const int level = window_simd_level();
    if (level == 2) {
      below = window_pass_avx512(data, b, e, L, U, out, cap, nout, maxkey);
    } else if (level == 1) {
      below = window_pass_avx2(data, b, e, L, U, out, cap, nout, maxkey);
    } else {
      below = window_pass_scalar<scalar_t, CT>(data, b, e, L, U, out, cap, nout, maxkey);
    }
  } else
#endif
  {
    below = window_pass_scalar<scalar_t, CT>(data, b, e, L, U, out, cap, nout, maxkey);
  }
  nan = *nout >= 0 && select::key_is_nan<CT>(maxkey);
  return below;
}

// The key of rank k (0-based) in cand and, if want_next, the key of rank k+1;
// cand is reordered.
template <typename Key>
void select_two(std::vector<Key>& cand, int64_t k, bool want_next, Key& out_k, Key& out_next) {
  std::nth_element(cand.begin(), cand.begin() + k, cand.end());
  out_k = cand[k];
  out_next = out_k;
  if (want_next) out_next = *std::min_element(cand.begin() + k + 1, cand.end());
}

// Chunks of at least kWindowMin keys per thread; the sampled window needs
// at least that many keys and draws kSamples of them.
constexpr int64_t kWindowMin = int64_t(1) << 16;
constexpr int kSamples = 4096;

// One parallel window pass over [L, U] in fixed chunks: true (cand, prefix
// set) if the window holds ranks lo and hi.  cap_share: the room per chunk, as
// a share of the chunk's keys (more keys in the window, a NaN, or ranks
// outside: false, and the caller falls back).
template <typename scalar_t, typename CT>
bool window_gather(const scalar_t* data, int64_t n, typename select::KeyTraits<CT>::Key L,
                   typename select::KeyTraits<CT>::Key U, double cap_share, int64_t lo, int64_t hi,
                   std::vector<typename select::KeyTraits<CT>::Key>& cand, int64_t& prefix) {
  using Key = typename select::KeyTraits<CT>::Key;
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kWindowMin));
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  const int64_t cap = static_cast<int64_t>(static_cast<double>(chunk) * cap_share) + 64;
  Scratch<Key> scr(static_cast<size_t>(cap * nchunks));  // uninitialised
  Key* const buf = scr.data;
  std::vector<int64_t> below(nchunks, 0), count(nchunks, 0);
  std::vector<char> nan_seen(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * chunk, e = std::min(n, b + chunk);
      bool nan = false;
      below[c] = window_pass<scalar_t, CT>(data, b, e, L, U, buf + c * cap, cap, &count[c], nan);
      nan_seen[c] = nan;
    }
  });
  int64_t total_below = 0, total = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (nan_seen[c] || count[c] < 0) return false;
    total_below += below[c];
    total += count[c];
  }
  if (lo < total_below || hi >= total_below + total) return false;
  cand.clear();
  cand.reserve(static_cast<size_t>(total));
  for (int64_t c = 0; c < nchunks; ++c) cand.insert(cand.end(), buf + c * cap, buf + c * cap + count[c]);
  prefix = total_below;
  return true;
}

// Sampled window (exact, usually one pass): the keys of a deterministic
// strided sample bound a window [L, U] that holds ranks lo and hi with high
// probability (+-4.5 sigma of the sample quantile); one parallel pass counts
// the keys below L and gathers those inside.  Returns false (caller falls back
// to the radix passes) if the ranks fall outside, the window is too wide, or a
// NaN was seen (the fallback handles NaN).  The result never depends on the
// sample: only how fast it is found.

template <typename scalar_t, typename CT>
bool window_select(const scalar_t* data, int64_t n, double q, int64_t lo, int64_t hi,
                   std::vector<typename select::KeyTraits<CT>::Key>& cand, int64_t& prefix) {
  using Key = typename select::KeyTraits<CT>::Key;
  std::vector<Key> sample(kSamples);
  const int64_t stride = n / kSamples;  // >= 16 since n >= kWindowMin
  for (int j = 0; j < kSamples; ++j) sample[j] = select::abs_key<CT>(static_cast<CT>(data[j * stride + stride / 2]));
  const double m = kSamples;
  const double margin = 4.5 * std::sqrt(m * q * (1.0 - q)) + 2.0;
  const double center = q * (m - 1);
  const int64_t s_lo = static_cast<int64_t>(std::max(0.0, std::floor(center - margin)));
  const int64_t s_hi = static_cast<int64_t>(std::min(m - 1, std::ceil(center + margin)));
  if (s_lo == 0 || s_hi == kSamples - 1) return false;  // window would be open-ended: no gain
  std::nth_element(sample.begin(), sample.begin() + s_lo, sample.end());
  const Key L = sample[s_lo];
  std::nth_element(sample.begin() + s_lo, sample.begin() + s_hi, sample.end());
  const Key U = sample[s_hi];

  // Room for 2x the expected share of the window per chunk (more means the
  // sample misled us, e.g. heavy ties: the radix passes handle that).
  return window_gather<scalar_t, CT>(data, n, L, U, (s_hi - s_lo + 1) / m * 2.0, lo, hi, cand, prefix);
}

// The previous result as a hint (exact either way).  A training step asks for
// the 0.99-quantile of the same weight storage every step, and it moves little
// between steps: the window [a_prev (1 - eps), a_prev (1 + eps)] around the
// previous answer usually holds the ranks, narrower than a sampled window and
// without the sample.  The cache maps (data pointer, n, q) to (a_prev, eps); a
// wrong or stale hint costs one window pass, after which the sampled or radix
// path runs as before.  The pointer is only compared, never read.
constexpr int64_t kHintMin = int64_t(1) << 13;
constexpr int kHintSlots = 64;

struct QuantileHint {
  const void* ptr = nullptr;
  int64_t n = 0;
  double q = 0.0;
  double a = 0.0;
  double eps = 0.0;
  uint64_t used = 0;  // last use (0: empty); the least recently used slot is replaced
};

struct HintStats {
  int64_t hits = 0, misses = 0;
  uint64_t clock = 0;
};

inline std::mutex& hint_mutex() {
  static std::mutex m;
  return m;
}
inline QuantileHint* hint_slots() {
  static QuantileHint slots[kHintSlots];
  return slots;
}
inline HintStats& hint_stats() {
  static HintStats st;
  return st;
}
inline bool hints_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("CODEQ_QUANTILE_HINT");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

inline bool hint_lookup(const void* ptr, int64_t n, double q, double& a, double& eps) {
  std::lock_guard<std::mutex> lock(hint_mutex());
  QuantileHint* slots = hint_slots();
  for (int i = 0; i < kHintSlots; ++i) {
    if (slots[i].used != 0 && slots[i].ptr == ptr && slots[i].n == n && slots[i].q == q) {
      a = slots[i].a;
      eps = slots[i].eps;
      slots[i].used = ++hint_stats().clock;
      return true;
    }
  }
  return false;
}

inline void hint_store(const void* ptr, int64_t n, double q, double a, double eps, bool hit) {
  std::lock_guard<std::mutex> lock(hint_mutex());
  QuantileHint* slots = hint_slots();
  auto& st = hint_stats();
  (hit ? st.hits : st.misses) += 1;
  int slot = -1, oldest = 0;
  for (int i = 0; i < kHintSlots && slot < 0; ++i) {
    if (slots[i].used != 0 && slots[i].ptr == ptr && slots[i].n == n && slots[i].q == q) slot = i;
    if (slots[i].used < slots[oldest].used) oldest = i;
  }
  if (slot < 0) slot = oldest;  // an empty slot, else the least recently used one
  slots[slot] = QuantileHint{ptr, n, q, a, eps, ++st.clock};
}

// The window pass over [key(a (1 - eps)), key(a (1 + eps))]: true (cand,
// prefix set) if it holds ranks lo and hi.
template <typename scalar_t, typename CT>
bool hint_select(const scalar_t* data, int64_t n, int64_t lo, int64_t hi, double a, double eps,
                 std::vector<typename select::KeyTraits<CT>::Key>& cand, int64_t& prefix) {
  using Key = typename select::KeyTraits<CT>::Key;
  if (!(a > 0.0) || !std::isfinite(a)) return false;
  const Key L = select::abs_key<CT>(static_cast<CT>(a * (1.0 - eps)));
  const Key U = select::abs_key<CT>(static_cast<CT>(a * (1.0 + eps)));
  if (select::key_is_nan<CT>(U)) return false;
  // more than 1/8 of the keys in the window: not worth it
  return window_gather<scalar_t, CT>(data, n, L, U, 1.0 / 8.0, lo, hi, cand, prefix);
}

template <typename scalar_t, typename CT = typename AccType<scalar_t>::type>
CT abs_quantile(const scalar_t* data, int64_t n, double q) {
  using Traits = select::KeyTraits<CT>;
  using Key = typename Traits::Key;
  constexpr int shift = key_shift1<CT>();
  const auto rank = dz::quantile_rank<CT>(n, q);

  std::vector<Key> cand;
  int64_t prefix = 0;

  constexpr int64_t kSmall = 1 << 12;
  const bool use_hint = n >= kHintMin && hints_enabled();
  double hint_a = 0.0, hint_eps = 0.0;
  const bool have_hint = use_hint && hint_lookup(data, n, q, hint_a, hint_eps);
  bool hit = false;
  if (have_hint && hint_select<scalar_t, CT>(data, n, rank.lo, rank.hi, hint_a, hint_eps, cand, prefix)) {
    hit = true;  // one pass over a narrow window around the previous answer
  } else if (n <= kSmall) {
    cand.resize(n);
    bool has_nan = false;
    for (int64_t i = 0; i < n; ++i) {
      cand[i] = select::abs_key<CT>(static_cast<CT>(data[i]));
      has_nan |= select::key_is_nan<CT>(cand[i]);
    }
    if (has_nan) return static_cast<CT>(NAN);  // torch.quantile: any NaN -> NaN
  } else if (n >= kWindowMin && window_select<scalar_t, CT>(data, n, q, rank.lo, rank.hi, cand, prefix)) {
    // one pass: the exact answer lies in a window found from a strided sample
  } else {
    // Fixed chunking (independent of thread ids; uint32 counts per chunk);
    // below 2 * kWindowMin keys one chunk, which runs on the calling thread (a
    // parallel region costs more than such a pass).
    const int64_t max_chunk = int64_t(1) << 30;
    const int64_t nchunks = std::max<int64_t>({int64_t(1), std::min<int64_t>(at::get_num_threads(), n / kWindowMin),
                                               (n + max_chunk - 1) / max_chunk});
    const int64_t chunk = (n + nchunks - 1) / nchunks;
    std::vector<uint32_t> hist(static_cast<size_t>(nchunks) * kBins1, 0);
    std::vector<char> nan_seen(nchunks, 0);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * chunk, e = std::min(n, b + chunk);
        nan_seen[c] = histogram_pass<scalar_t, CT>(data, b, e, hist.data() + c * kBins1);
      }
    });
    for (int64_t c = 0; c < nchunks; ++c)
      if (nan_seen[c]) return static_cast<CT>(NAN);
    std::vector<int64_t> total(kBins1, 0);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int b = 0; b < kBins1; ++b) total[b] += hist[c * kBins1 + b];
    // Bins of ranks lo and hi.
    int b_lo = -1, b_hi = -1;
    int64_t cum = 0;
    for (int b = 0; b < kBins1; ++b) {
      const int64_t next = cum + total[b];
      if (b_lo < 0 && rank.lo < next) {
        b_lo = b;
        prefix = cum;
      }
      if (rank.hi < next) {
        b_hi = b;
        break;
      }
      cum = next;
    }
    // Pass 2: gather the keys of bins [b_lo, b_hi] -- a window pass whose
    // per-chunk counts the histogram already gave (plus the SIMD store's slack).
    const Key key_lo = static_cast<Key>(b_lo) << shift;
    const Key key_hi = (static_cast<Key>(b_hi + 1) << shift) - 1;
    std::vector<int64_t> offset(nchunks + 1, 0), got(nchunks, 0);
    for (int64_t c = 0; c < nchunks; ++c) {
      int64_t in_bins = 0;
      for (int b = b_lo; b <= b_hi; ++b) in_bins += hist[c * kBins1 + b];
      offset[c + 1] = offset[c] + in_bins + 16;
    }
    std::unique_ptr<Key[]> buf(new Key[static_cast<size_t>(offset[nchunks])]);  // uninitialised
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * chunk, e = std::min(n, b + chunk);
        bool nan = false;
        window_pass<scalar_t, CT>(data, b, e, key_lo, key_hi, buf.get() + offset[c], offset[c + 1] - offset[c],
                                  &got[c], nan);
      }
    });
    size_t count = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      TORCH_CHECK(got[c] >= 0 && got[c] + 16 == offset[c + 1] - offset[c],
                  "codeq.abs_quantile: internal error (the gather pass disagrees with the histogram)");
      count += static_cast<size_t>(got[c]);
    }
    cand.reserve(count);
    for (int64_t c = 0; c < nchunks; ++c) cand.insert(cand.end(), buf.get() + offset[c], buf.get() + offset[c] + got[c]);

    // Narrow large candidate sets (heavy ties, flat distributions) with 8-bit
    // radix passes over the next key bits before the final nth_element.
    int level_shift = shift;
    while (cand.size() > 4096 && level_shift > 0) {
      level_shift = std::max(0, level_shift - 8);
      // The candidates share their bits above the previous level (one or two
      // neighbouring bins), so the next 8 bits span at most 512 buckets.
      const Key kmin = *std::min_element(cand.begin(), cand.end());
      const Key kmax = *std::max_element(cand.begin(), cand.end());
      const Key lo_b = kmin >> level_shift, hi_b = kmax >> level_shift;
      if (hi_b - lo_b >= (Key(1) << 12)) break;  // unexpected spread: let nth_element finish
      std::vector<int64_t> h(static_cast<size_t>(hi_b - lo_b + 1), 0);
      for (Key k : cand) h[(k >> level_shift) - lo_b]++;
      int64_t c2 = prefix;
      size_t bl = SIZE_MAX, bh = SIZE_MAX;
      int64_t new_prefix = prefix;
      for (size_t bb = 0; bb < h.size(); ++bb) {
        const int64_t next = c2 + h[bb];
        if (bl == SIZE_MAX && rank.lo < next) {
          bl = bb;
          new_prefix = c2;
        }
        if (rank.hi < next) {
          bh = bb;
          break;
        }
        c2 = next;
      }
      if (bl == 0 && bh == h.size() - 1) break;  // no progress possible at this level
      std::vector<Key> next_cand;
      next_cand.reserve(static_cast<size_t>(h[bl] + (bh != bl ? h[bh] : 0)));
      for (Key k : cand) {
        const Key kb = (k >> level_shift) - lo_b;
        if (kb >= bl && kb <= bh) next_cand.push_back(k);
      }
      cand.swap(next_cand);
      prefix = new_prefix;
    }
  }

  Key k_lo, k_hi;
  select_two(cand, rank.lo - prefix, rank.hi != rank.lo, k_lo, k_hi);
  const CT result = dz::lerp<CT>(select::key_value<CT>(k_lo), select::key_value<CT>(k_hi), rank.weight);
  if (use_hint) {
    // Next window: 4x this call's relative change, shrinking at most by half a
    // call, at most 5%; after a miss at least twice as wide.  At least 0.1%,
    // and at least 256/n: around a 0.99-quantile a window of relative width
    // 2 eps holds about 0.15 n eps keys of a Gaussian-like weight, and a
    // window that expects only a few keys misses ranks lo/hi every other call
    // (each miss costs the full select).
    const double r = static_cast<double>(result);
    const double eps_min = std::max(0.001, 256.0 / static_cast<double>(n));
    double eps = std::max(0.01, eps_min);
    if (have_hint && hint_a > 0.0 && std::isfinite(r)) {
      const double change = 4.0 * std::fabs(r - hint_a) / hint_a + 0.0005;
      eps = hit ? std::max(change, 0.5 * hint_eps) : std::max(change, 2.0 * hint_eps);
      eps = std::min(0.05, std::max(eps_min, eps));
    }
    hint_store(data, n, q, r, eps, hit);
  }
  return result;
}

}  // namespace cpu
}  // namespace codeq
