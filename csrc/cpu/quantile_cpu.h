// Exact q-quantile of |x| on the CPU in O(n): one parallel histogram pass over
// the top 15 bits of the order-preserving key (codeq/select.h), then an
// nth_element over the few elements of the one or two bins that hold ranks lo
// and lo+1.  Bitwise equal to sorting |x| (ties and the lerp included).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/select.h"

namespace codeq {
namespace cpu {

template <typename scalar_t, typename CT = typename AccType<scalar_t>::type>
CT abs_quantile(const scalar_t* data, int64_t n, double q) {
  using Traits = select::KeyTraits<CT>;
  using Key = typename Traits::Key;
  const auto rank = dz::quantile_rank<CT>(n, q);

  std::vector<Key> cand;
  int64_t prefix = 0;
  bool has_nan = false;

  constexpr int64_t kSmall = 1 << 14;
  if (n <= kSmall) {
    cand.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      cand[i] = select::abs_key<CT>(static_cast<CT>(data[i]));
      has_nan |= select::key_is_nan<CT>(cand[i]);
    }
  } else {
    // Pass 1: one histogram per chunk (no races, no dependence on thread ids).
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kSmall));
    const int64_t chunk = (n + nchunks - 1) / nchunks;
    const int nb = select::kFirstBins;
    std::vector<int64_t> hist(static_cast<size_t>(nchunks) * nb, 0);
    std::vector<char> nan_seen(nchunks, 0);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t* h = hist.data() + c * nb;
        const int64_t b = c * chunk, e = std::min(n, b + chunk);
        bool nan_here = false;
        for (int64_t i = b; i < e; ++i) {
          const Key k = select::abs_key<CT>(static_cast<CT>(data[i]));
          nan_here |= select::key_is_nan<CT>(k);
          h[select::first_bin<CT>(k)]++;
        }
        nan_seen[c] = nan_here;
      }
    });
    for (int64_t c = 0; c < nchunks; ++c) has_nan |= nan_seen[c] != 0;
    if (has_nan) return static_cast<CT>(NAN);
    for (int64_t c = 1; c < nchunks; ++c) {
      const int64_t* h = hist.data() + c * nb;
      for (int b = 0; b < nb; ++b) hist[b] += h[b];
    }
    // Bins of ranks lo and hi.
    int b_lo = -1, b_hi = -1;
    int64_t cum = 0;
    for (int b = 0; b < nb; ++b) {
      const int64_t next = cum + hist[b];
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
    // Pass 2: gather the keys of bins [b_lo, b_hi] (per chunk, then joined).
    std::vector<std::vector<Key>> parts(nchunks);
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c * chunk, e = std::min(n, b + chunk);
        auto& out = parts[c];
        for (int64_t i = b; i < e; ++i) {
          const Key k = select::abs_key<CT>(static_cast<CT>(data[i]));
          const int bin = select::first_bin<CT>(k);
          if (bin >= b_lo && bin <= b_hi) out.push_back(k);
        }
      }
    });
    size_t total = 0;
    for (auto& p : parts) total += p.size();
    cand.reserve(total);
    for (auto& p : parts) cand.insert(cand.end(), p.begin(), p.end());
  }
  if (has_nan) return static_cast<CT>(NAN);  // torch.quantile: any NaN -> NaN

  const int64_t k = rank.lo - prefix;
  std::nth_element(cand.begin(), cand.begin() + k, cand.end());
  const Key k_lo = cand[k];
  Key k_hi = k_lo;
  if (rank.hi != rank.lo) k_hi = *std::min_element(cand.begin() + k + 1, cand.end());
  return dz::lerp<CT>(select::key_value<CT>(k_lo), select::key_value<CT>(k_hi), rank.weight);
}

}  // namespace cpu
}  // namespace codeq
