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

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/select.h"
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
// appends the keys inside the window to out, and reports a NaN.
template <typename scalar_t, typename CT>
CODEQ_CPU_CLONES int64_t window_pass(const scalar_t* __restrict data, int64_t b, int64_t e,
                                     typename select::KeyTraits<CT>::Key L, typename select::KeyTraits<CT>::Key U,
                                     std::vector<typename select::KeyTraits<CT>::Key>& out, bool& nan) {
  using Key = typename select::KeyTraits<CT>::Key;
  int64_t below = 0;
  Key maxkey = 0;
  for (int64_t i = b; i < e; ++i) {
    const Key k = select::abs_key<CT>(static_cast<CT>(data[i]));
    maxkey = std::max(maxkey, k);
    below += k < L;
    if (k >= L && k <= U) out.push_back(k);
  }
  nan = select::key_is_nan<CT>(maxkey);
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

// Sampled window (exact, usually one pass): the keys of a deterministic
// strided sample bound a window [L, U] that holds ranks lo and hi with high
// probability (+-4.5 sigma of the sample quantile); one parallel pass counts
// the keys below L and gathers those inside.  Returns false (caller falls back
// to the radix passes) if the ranks fall outside, the window is too wide, or a
// NaN was seen (the fallback handles NaN).  The result never depends on the
// sample: only how fast it is found.
constexpr int64_t kWindowMin = int64_t(1) << 16;
constexpr int kSamples = 4096;

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

  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kWindowMin));
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  std::vector<std::vector<Key>> parts(nchunks);
  std::vector<int64_t> below(nchunks, 0);
  std::vector<char> nan_seen(nchunks, 0);
  const size_t expect = static_cast<size_t>(static_cast<double>(chunk) * (s_hi - s_lo + 1) / m * 1.5) + 64;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * chunk, e = std::min(n, b + chunk);
      parts[c].reserve(expect);
      bool nan = false;
      below[c] = window_pass<scalar_t, CT>(data, b, e, L, U, parts[c], nan);
      nan_seen[c] = nan;
    }
  });
  int64_t total_below = 0;
  size_t count = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (nan_seen[c]) return false;
    total_below += below[c];
    count += parts[c].size();
  }
  if (lo < total_below || hi >= total_below + static_cast<int64_t>(count)) return false;
  cand.clear();
  cand.reserve(count);
  for (auto& p : parts) cand.insert(cand.end(), p.begin(), p.end());
  prefix = total_below;
  return true;
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
  if (n <= kSmall) {
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
    // Fixed chunking (independent of thread ids; uint32 counts per chunk).
    const int64_t max_chunk = int64_t(1) << 30;
    const int64_t nchunks = std::max<int64_t>({int64_t(1), std::min<int64_t>(at::get_num_threads(), n / kSmall),
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
    // Pass 2: gather the keys of bins [b_lo, b_hi].
    const Key key_lo = static_cast<Key>(b_lo) << shift;
    const Key key_hi = (static_cast<Key>(b_hi + 1) << shift) - 1;
    std::vector<std::vector<Key>> parts(nchunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * chunk, e = std::min(n, b + chunk);
        auto& out = parts[c];
        for (int64_t i = b; i < e; ++i) {
          const Key k = select::abs_key<CT>(static_cast<CT>(data[i]));
          if (k >= key_lo && k <= key_hi) out.push_back(k);
        }
      }
    });
    size_t count = 0;
    for (auto& p : parts) count += p.size();
    cand.reserve(count);
    for (auto& p : parts) cand.insert(cand.end(), p.begin(), p.end());

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
  return dz::lerp<CT>(select::key_value<CT>(k_lo), select::key_value<CT>(k_hi), rank.weight);
}

}  // namespace cpu
}  // namespace codeq
