// Exact q-quantile of |x| on the CPU, bitwise equal to sorting |x| (ties and
// torch.lerp's interpolation included), in O(n).
//
// The keys of codeq/select.h order |x| as unsigned integers, so the quantile
// is an integer selection of ranks lo and lo + 1, done one of two ways:
//   - radix select: a histogram of the top kBits key bits, then one pass that
//     gathers the keys of the one or two bins holding ranks lo and lo + 1, and
//     nth_element on those;
//   - a window around the previous answer: training asks for the quantile of
//     the same weight storage every step, and it moves little between steps,
//     so one pass that counts the keys below a narrow window around the last
//     answer and gathers the keys inside it usually holds both ranks.  When it
//     does not (a jump, the first call), radix select runs.
// Both are exact; benchmarks/results/ab_special_paths.md has what the window
// saves.  Every pass works in chunks fixed by n, so the result never depends
// on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/select.h"
#include "cpu/simd.h"

namespace codeq {
namespace cpu {

template <typename CT>
using Key = typename select::KeyTraits<CT>::Key;

constexpr int kHistBits = 11;                  // sign-cleared exponent + top mantissa bits
constexpr int64_t kMinChunk = int64_t(1) << 16;  // keys per parallel chunk, at least
constexpr int kBlock = 64;                     // keys counted as one vector block

// The counts of one block: keys below L, keys inside [L, L + width], the
// largest key.  A pure reduction, which the compiler vectorises.
template <typename scalar_t, typename CT>
__attribute__((always_inline)) inline void block_counts(const scalar_t* __restrict d, Key<CT> L, Key<CT> width,
                                                        uint32_t& below, uint32_t& inside, Key<CT>& max) {
  uint32_t b = 0, in = 0;
  Key<CT> m = 0;
  for (int j = 0; j < kBlock; ++j) {
    const Key<CT> k = select::abs_key<CT>(static_cast<CT>(d[j]));
    b += k < L;
    in += Key<CT>(k - L) <= width;
    m = m > k ? m : k;
  }
  below = b;
  inside = in;
  max = m;
}

// Over [b, e): the count of keys below L (returned), the keys inside [L, U]
// appended to out (their count in *nout; -1 when more than cap would be
// needed) and the largest key (a NaN's key is larger than any other) in *max.
// A block is walked again only if it holds a key of the window; that walk
// writes every key and advances past those inside (no branches), so out needs
// room for a whole block beyond the last key kept.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES int64_t window_pass(const scalar_t* __restrict data, int64_t b, int64_t e, Key<CT> L, Key<CT> U,
                                     Key<CT>* __restrict out, int64_t cap, int64_t* nout, Key<CT>* max) {
  const Key<CT> width = U - L;  // k in [L, U]  <=>  k - L <= width, unsigned
  int64_t below = 0, cnt = 0;
  Key<CT> mx = 0;
  int64_t i = b;
  for (; i + kBlock <= e; i += kBlock) {
    uint32_t blk_below, blk_in;
    Key<CT> blk_max;
    block_counts<scalar_t, CT>(data + i, L, width, blk_below, blk_in, blk_max);
    below += blk_below;
    mx = std::max(mx, blk_max);
    if (blk_in == 0) continue;
    if (cnt + kBlock > cap) {
      *nout = -1;
      return below;
    }
    for (int j = 0; j < kBlock; ++j) {
      const Key<CT> k = select::abs_key<CT>(static_cast<CT>(data[i + j]));
      out[cnt] = k;
      cnt += Key<CT>(k - L) <= width;
    }
  }
  for (; i < e; ++i) {
    const Key<CT> k = select::abs_key<CT>(static_cast<CT>(data[i]));
    below += k < L;
    mx = std::max(mx, k);
    if (Key<CT>(k - L) <= width) {
      if (cnt >= cap) {
        *nout = -1;
        return below;
      }
      out[cnt++] = k;
    }
  }
  *nout = cnt;
  *max = mx;
  return below;
}

// Counts per bin of the top kHistBits key bits over [b, e) into hist; returns
// the largest key.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES Key<CT> histogram_pass(const scalar_t* __restrict data, int64_t b, int64_t e,
                                         uint32_t* __restrict hist) {
  constexpr int shift = select::KeyTraits<CT>::kBits - 1 - kHistBits;
  Key<CT> mx = 0;
  for (int64_t i = b; i < e; ++i) {
    const Key<CT> k = select::abs_key<CT>(static_cast<CT>(data[i]));
    mx = std::max(mx, k);
    hist[k >> shift]++;
  }
  return mx;
}

// The chunks of a pass over n keys: as many as threads, each kMinChunk keys
// or more, at most 2^30 (the histogram counts are 32-bit).
inline int64_t num_chunks(int64_t n) {
  const int64_t by_threads = std::min<int64_t>(at::get_num_threads(), n / kMinChunk);
  return std::max<int64_t>({int64_t(1), by_threads, (n + (int64_t(1) << 30) - 1) >> 30});
}

// The keys of [L, U] in `cand` and the count of keys below L in *prefix, by
// one parallel window pass with room for caps[c] keys in chunk c.  False when
// a chunk overflowed, the window misses rank lo or hi, or a NaN was seen
// (*nan).
template <typename scalar_t, typename CT>
bool gather_window(const scalar_t* data, int64_t n, Key<CT> L, Key<CT> U, const std::vector<int64_t>& caps,
                   int64_t lo, int64_t hi, std::vector<Key<CT>>& cand, int64_t* prefix, bool* nan) {
  const int64_t nchunks = static_cast<int64_t>(caps.size());
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  std::vector<int64_t> offset(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) offset[c + 1] = offset[c] + caps[c];
  std::unique_ptr<Key<CT>[]> buf(new Key<CT>[static_cast<size_t>(offset[nchunks])]);
  std::vector<int64_t> below(nchunks), count(nchunks);
  std::vector<Key<CT>> mx(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * chunk, e = std::min(n, b + chunk);
      below[c] = window_pass<scalar_t, CT>(data, b, e, L, U, buf.get() + offset[c], caps[c], &count[c], &mx[c]);
    }
  });
  int64_t total_below = 0, total = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (count[c] < 0) return false;
    *nan |= select::key_is_nan<CT>(mx[c]);
    total_below += below[c];
    total += count[c];
  }
  if (*nan || lo < total_below || hi >= total_below + total) return false;
  cand.clear();
  for (int64_t c = 0; c < nchunks; ++c) cand.insert(cand.end(), buf.get() + offset[c], buf.get() + offset[c] + count[c]);
  *prefix = total_below;
  return true;
}

// Radix select: the histogram of all chunks, the bins holding ranks lo and hi,
// then the window pass over those bins (whose per-chunk counts the histogram
// gives).  False, with *nan set, when a NaN was seen.
template <typename scalar_t, typename CT>
bool radix_select(const scalar_t* data, int64_t n, int64_t lo, int64_t hi, std::vector<Key<CT>>& cand,
                  int64_t* prefix, bool* nan) {
  constexpr int shift = select::KeyTraits<CT>::kBits - 1 - kHistBits;
  constexpr int kBins = 1 << kHistBits;
  const int64_t nchunks = num_chunks(n);
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  std::vector<uint32_t> hist(static_cast<size_t>(nchunks * kBins), 0);
  std::vector<Key<CT>> mx(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      mx[c] = histogram_pass<scalar_t, CT>(data, c * chunk, std::min(n, (c + 1) * chunk), hist.data() + c * kBins);
  });
  for (const Key<CT> m : mx) *nan |= select::key_is_nan<CT>(m);
  if (*nan) return false;
  int b_lo = -1, b_hi = -1;
  int64_t cum = 0;
  for (int bin = 0; bin < kBins && b_hi < 0; ++bin) {
    int64_t count = 0;
    for (int64_t c = 0; c < nchunks; ++c) count += hist[c * kBins + bin];
    if (b_lo < 0 && lo < cum + count) b_lo = bin;
    if (hi < cum + count) b_hi = bin;
    cum += count;
  }
  std::vector<int64_t> caps(nchunks, kBlock);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int bin = b_lo; bin <= b_hi; ++bin) caps[c] += hist[c * kBins + bin];
  const Key<CT> L = static_cast<Key<CT>>(b_lo) << shift;
  const Key<CT> U = (static_cast<Key<CT>>(b_hi + 1) << shift) - 1;
  const bool ok = gather_window<scalar_t, CT>(data, n, L, U, caps, lo, hi, cand, prefix, nan);
  TORCH_CHECK(ok, "codeq.abs_quantile: internal error (the gather pass disagrees with the histogram)");
  return true;
}

// The previous answer per (storage, n, q), and the half-width of the next
// window relative to it.  The pointer is only compared, never read.
struct QuantileHints {
  struct Hint {
    double a = 0.0, eps = 0.0;
  };
  std::mutex mutex;
  std::map<std::tuple<const void*, int64_t, double>, Hint> map;
  int64_t hits = 0, misses = 0;  // for the tests
  static constexpr size_t kMax = 1024;  // forget them all beyond this many
};

inline QuantileHints& quantile_hints() {
  static QuantileHints h;
  return h;
}

template <typename scalar_t, typename CT = typename AccType<scalar_t>::type>
CT abs_quantile(const scalar_t* data, int64_t n, double q) {
  const auto rank = dz::quantile_rank<CT>(n, q);
  const auto key = std::make_tuple(static_cast<const void*>(data), n, q);
  auto& hints = quantile_hints();
  QuantileHints::Hint hint;
  {
    std::lock_guard<std::mutex> lock(hints.mutex);
    const auto it = hints.map.find(key);
    if (it != hints.map.end()) hint = it->second;
  }
  std::vector<Key<CT>> cand;
  int64_t prefix = 0;
  bool nan = false, hit = false;
  if (hint.a > 0.0) {
    const Key<CT> L = select::abs_key<CT>(static_cast<CT>(hint.a * (1.0 - hint.eps)));
    const Key<CT> U = select::abs_key<CT>(static_cast<CT>(hint.a * (1.0 + hint.eps)));
    const int64_t nchunks = num_chunks(n);
    // More than 1/8 of the keys in the window: radix select does better.
    const std::vector<int64_t> caps(nchunks, (n + nchunks - 1) / nchunks / 8 + kBlock);
    hit = !select::key_is_nan<CT>(U) &&
          gather_window<scalar_t, CT>(data, n, L, U, caps, rank.lo, rank.hi, cand, &prefix, &nan);
  }
  if (!hit && !nan) radix_select<scalar_t, CT>(data, n, rank.lo, rank.hi, cand, &prefix, &nan);
  if (nan) return static_cast<CT>(NAN);  // torch.quantile: a NaN anywhere gives NaN

  const auto k_lo = cand.begin() + (rank.lo - prefix);
  std::nth_element(cand.begin(), k_lo, cand.end());
  const Key<CT> hi_key = rank.hi == rank.lo ? *k_lo : *std::min_element(k_lo + 1, cand.end());
  const CT result = dz::lerp<CT>(select::key_value<CT>(*k_lo), select::key_value<CT>(hi_key), rank.weight);

  // The next window: 4x this call's relative change, twice the last width
  // after a miss; at least 0.1% and 256/n (a window expecting only a few keys
  // misses every other call), at most 5%.
  const double r = static_cast<double>(result);
  if (r > 0.0 && std::isfinite(r)) {
    const double eps_min = std::max(0.001, 256.0 / static_cast<double>(n));
    double eps = 0.01;
    if (hint.a > 0.0) eps = hit ? 4.0 * std::fabs(r - hint.a) / hint.a : 2.0 * hint.eps;
    std::lock_guard<std::mutex> lock(hints.mutex);
    if (hints.map.size() >= QuantileHints::kMax) hints.map.clear();
    hints.map[key] = QuantileHints::Hint{r, std::min(0.05, std::max(eps_min, eps))};
    (hit ? hints.hits : hints.misses) += 1;
  }
  return result;
}

}  // namespace cpu
}  // namespace codeq
