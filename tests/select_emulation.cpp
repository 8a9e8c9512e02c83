// Host emulation of the CUDA radix select (csrc/cuda/quantile_cuda.cu), built
// from the same header helpers (codeq/select.h: Radix, resolve_hi; codeq/
// deadzone.h: quantile_rank, lerp), checked against a full sort + lerp.
// tests/test_select_emulation.py compiles and runs it; no GPU needed.
//
// The device kernels differ from this emulation only in how a histogram is
// built (shared-memory atomics + global atomics: integer counts, order-free)
// and how the digit is found (block scan instead of a sequential scan).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "codeq/deadzone.h"
#include "codeq/select.h"

using namespace codeq;

template <typename CT>
CT emulate(const std::vector<CT>& x, double q) {
  using R = select::Radix<CT>;
  using Key = typename R::Key;
  const int64_t n = static_cast<int64_t>(x.size());
  const auto rk = dz::quantile_rank<CT>(n, q);
  Key prefix = 0;
  int64_t rank = rk.lo;
  bool nan = false;
  Key min_above = ~Key(0);
  int digit = 0, next = -1;
  uint64_t count = 0;
  for (int p = 0; p < R::kPasses; ++p) {
    std::vector<uint64_t> hist(select::kDigitBins, 0);
    const int hi = R::pass_hi_bit(p);
    const bool first = p == 0, last = p == R::kPasses - 1;
    for (CT v : x) {
      const Key k = select::abs_key<CT>(v);
      if (first) nan |= select::key_is_nan<CT>(k);
      if (last && R::above_group(k, prefix, hi) && k < min_above) min_above = k;
      if (R::in_group(k, prefix, hi)) {
        const int d = R::digit(k, p);
        if (d < 0 || d >= select::kDigitBins) {
          std::printf("digit out of range\n");
          std::exit(2);
        }
        hist[d]++;
      }
    }
    uint64_t cum = 0;
    bool found = false;
    for (int b = 0; b < select::kDigitBins; ++b) {
      if (!found && hist[b] > 0 && cum <= (uint64_t)rank && (uint64_t)rank < cum + hist[b]) {
        digit = b;
        count = hist[b];
        found = true;
        rank -= (int64_t)cum;
      }
      cum += hist[b];
    }
    if (!found) {
      std::printf("rank not found in pass %d\n", p);
      std::exit(2);
    }
    next = -1;
    if (last)
      for (int b = digit + 1; b < select::kDigitBins; ++b)
        if (hist[b] > 0) {
          next = b;
          break;
        }
    prefix = R::with_digit(prefix, p, digit);
  }
  const Key k_hi = select::resolve_hi<CT>(prefix, rk.hi == rk.lo, rank, (int64_t)count, next, min_above);
  if (nan) return std::numeric_limits<CT>::quiet_NaN();
  return dz::lerp<CT>(select::key_value<CT>(prefix), select::key_value<CT>(k_hi), rk.weight);
}

template <typename CT>
CT by_sort(const std::vector<CT>& x, double q) {
  std::vector<CT> v;
  bool nan = false;
  for (CT e : x) {
    nan |= std::isnan(e);
    v.push_back(std::fabs(e));
  }
  if (nan) return std::numeric_limits<CT>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const auto rk = dz::quantile_rank<CT>((int64_t)v.size(), q);
  return dz::lerp<CT>(v[rk.lo], v[rk.hi], rk.weight);
}

template <typename CT>
bool same_bits(CT a, CT b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  return std::memcmp(&a, &b, sizeof(CT)) == 0;
}

template <typename CT>
int run_cases(const char* name) {
  std::mt19937_64 gen(1234);
  int fails = 0, cases = 0;
  const int64_t sizes[] = {1, 2, 3, 7, 100, 101, 257, 1000, 4097, 20000};
  const double qs[] = {0.99, 0.5, 0.0, 1.0, 0.25};
  for (int kind = 0; kind < 10; ++kind) {
    for (int64_t n : sizes) {
      std::vector<CT> x(n);
      std::normal_distribution<double> nd(0.0, 0.02);
      std::uniform_int_distribution<int> small(-3, 3);
      for (int64_t i = 0; i < n; ++i) {
        switch (kind) {
          case 0: x[i] = (CT)nd(gen); break;                                 // gaussian
          case 1: x[i] = (CT)small(gen); break;                              // heavy ties
          case 2: x[i] = 0; break;                                           // all zero
          case 3: x[i] = (CT)(nd(gen) * 1e-38); break;                       // subnormals
          case 4: x[i] = (i % 97 == 0) ? std::numeric_limits<CT>::infinity() : (CT)nd(gen); break;  // +Inf
          case 5: x[i] = (CT)nd(gen); if (i == n / 2) x[i] = std::numeric_limits<CT>::quiet_NaN(); break;
          case 6: x[i] = (CT)(i % 2 ? 1.0 : -1.0) * (CT)(1 + (i % 3)) ; break;  // 3 distinct values
          case 7: x[i] = (CT)std::ldexp(1.0, (int)(i % 40) - 20); break;        // powers of two
          case 8: x[i] = (i == n - 1) ? (CT)1e30 : (CT)1.0; break;             // one outlier above ties
          default: x[i] = (CT)(nd(gen) * std::exp(nd(gen) * 300)); break;       // wide range
        }
      }
      for (double q : qs) {
        ++cases;
        const CT a = emulate<CT>(x, q), b = by_sort<CT>(x, q);
        if (!same_bits(a, b)) {
          ++fails;
          std::printf("%s MISMATCH kind=%d n=%lld q=%g: emulated %.17g sorted %.17g\n", name, kind, (long long)n, q,
                      (double)a, (double)b);
        }
      }
    }
  }
  std::printf("%s: %d cases, %d mismatches\n", name, cases, fails);
  return fails;
}

int main() {
  const int f = run_cases<float>("float") + run_cases<double>("double");
  return f == 0 ? 0 : 1;
}
