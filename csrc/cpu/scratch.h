// Scratch memory for the CPU kernels (host code only).
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

namespace codeq {
namespace cpu {

// Scratch memory of n elements: up to kScratchMax a per-thread buffer kept
// between calls (a fresh malloc of tens of KB right after a training step's
// frees costs glibc several microseconds), above that a fresh allocation.
// One Scratch<T> alive per thread at a time.
constexpr size_t kScratchMax = size_t(1) << 18;

template <typename T>
struct Scratch {
  T* data = nullptr;
  std::unique_ptr<T[]> own;
  explicit Scratch(size_t n) {
    static thread_local std::vector<T> buf;
    if (n > kScratchMax) {
      own.reset(new T[n]);
      data = own.get();
      return;
    }
    if (buf.size() < n) buf.resize(n);
    data = buf.data();
  }
};

}  // namespace cpu
}  // namespace codeq
