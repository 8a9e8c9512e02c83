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
#ifdef CODEQ_DEVICE_CODE
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
#ifdef CODEQ_DEVICE_CODE
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

// The first radix pass looks at the top kFirstBits bits below the (cleared)
// sign bit: 2^15 bins.
constexpr int kFirstBits = 15;
constexpr int kFirstBins = 1 << kFirstBits;

template <typename CT>
CODEQ_HD int first_bin(typename KeyTraits<CT>::Key k) {
  return static_cast<int>(k >> (KeyTraits<CT>::kBits - 1 - kFirstBits));
}

}  // namespace select
}  // namespace codeq
