// Order-preserving integer keys for |x|, shared by the CPU and CUDA quantile
// selection (radix select over the float bits).
//
// For a non-negative IEEE value the raw bit pattern, read as an unsigned
// integer, orders exactly like the value: +0 < subnormals < normals < +Inf <
// NaN.  Clearing the sign bit gives |x|, so key(x) = bits(x) & ~sign orders
// |x| ascending with every NaN above +Inf -- the order torch.sort uses.
#pragma once

#include <cstring>

#include "codeq/common.h"

namespace codeq {
namespace select {

template <typename CT>
struct KeyTraits;

template <>
struct KeyTraits<float> {
  using Key = uint32_t;
  static constexpr int kBits = 32;
  static constexpr Key kAbsMask = 0x7fffffffu;
  static constexpr Key kInf = 0x7f800000u;
};

template <>
struct KeyTraits<double> {
  using Key = uint64_t;
  static constexpr int kBits = 64;
  static constexpr Key kAbsMask = 0x7fffffffffffffffull;
  static constexpr Key kInf = 0x7ff0000000000000ull;
};

template <typename CT>
CODEQ_HD typename KeyTraits<CT>::Key abs_key(CT x) {
  typename KeyTraits<CT>::Key k;
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(CT) == 4) {
    k = static_cast<typename KeyTraits<CT>::Key>(__float_as_uint(x));
  } else {
    k = static_cast<typename KeyTraits<CT>::Key>(__double_as_longlong(x));
  }
#else
  std::memcpy(&k, &x, sizeof(CT));
#endif
  return k & KeyTraits<CT>::kAbsMask;
}

template <typename CT>
CODEQ_HD CT key_value(typename KeyTraits<CT>::Key k) {
  CT x;
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(CT) == 4) {
    x = __uint_as_float(static_cast<unsigned int>(k));
  } else {
    x = __longlong_as_double(static_cast<long long>(k));
  }
#else
  std::memcpy(&x, &k, sizeof(CT));
#endif
  return x;
}

template <typename CT>
CODEQ_HD bool key_is_nan(typename KeyTraits<CT>::Key k) {
  return k > KeyTraits<CT>::kInf;
}

// ------------------------------------------------- multi-pass radix select --
// The CUDA quantile (csrc/cuda/quantile_cuda.cu) selects the key of rank lo by
// kPasses digit passes of at most kDigitBits bits each, from the most
// significant bit of the (sign-cleared) key down to bit 0.  Pass p only counts
// the keys that share the bits above pass_hi_bit(p) with the prefix chosen so
// far (the "group"); after the last pass the prefix is the key itself.
// Float keys: 31 bits = 11 + 11 + 9 (3 passes); double: 63 bits, 6 passes.
// These helpers are plain host/device code; tests/select_emulation.cpp runs the
// same schedule sequentially on the host against a full sort.
constexpr int kDigitBits = 11;
constexpr int kDigitBins = 1 << kDigitBits;

template <typename CT>
struct Radix {
  using Key = typename KeyTraits<CT>::Key;
  static constexpr int kKeyBits = KeyTraits<CT>::kBits - 1;  // the sign bit is always 0
  static constexpr int kPasses = (kKeyBits + kDigitBits - 1) / kDigitBits;

  // Bits [pass_shift(p), pass_hi_bit(p)) are the digit of pass p.
  static CODEQ_HD int pass_hi_bit(int p) { return kKeyBits - kDigitBits * p; }
  static CODEQ_HD int pass_shift(int p) {
    const int s = pass_hi_bit(p) - kDigitBits;
    return s > 0 ? s : 0;
  }
  // True when k has the bits of prefix above bit hi (hi <= kKeyBits < bit width).
  static CODEQ_HD bool in_group(Key k, Key prefix, int hi) { return (k >> hi) == (prefix >> hi); }
  // True when k lies above every key of the group of prefix.
  static CODEQ_HD bool above_group(Key k, Key prefix, int hi) { return (k >> hi) > (prefix >> hi); }
  static CODEQ_HD int digit(Key k, int p) {
    const int sh = pass_shift(p);
    const Key mask = (Key(1) << (pass_hi_bit(p) - sh)) - 1;
    return static_cast<int>((k >> sh) & mask);
  }
  static CODEQ_HD Key with_digit(Key prefix, int p, int d) { return prefix | (static_cast<Key>(d) << pass_shift(p)); }
};

// After the last pass: the key of rank lo is k_lo, which is the digit d_lo of
// the last histogram.  The key of rank hi (= lo + 1, or lo when lo is the last
// rank) is k_lo again when the ranks tie (rank_in_bin + 1 < count of that
// bin), else the next non-empty digit of the last histogram (d_next >= 0), else
// the smallest key above the last group (min_above), which then exists.
template <typename CT>
CODEQ_HD typename Radix<CT>::Key resolve_hi(typename Radix<CT>::Key k_lo, bool same_rank, int64_t rank_in_bin,
                                            int64_t count_in_bin, int d_next, typename Radix<CT>::Key min_above) {
  if (same_rank || rank_in_bin + 1 < count_in_bin) return k_lo;
  const int last = Radix<CT>::kPasses - 1;
  if (d_next >= 0) {
    using Key = typename Radix<CT>::Key;
    const Key group = (k_lo >> Radix<CT>::pass_hi_bit(last)) << Radix<CT>::pass_hi_bit(last);
    return Radix<CT>::with_digit(group, last, d_next);
  }
  return min_above;
}

}  // namespace select
}  // namespace codeq
