// Group lasso over the columns of W.reshape(out, -1), shared CPU/CUDA math.
//   loss = sum_l lambda_l * sum_j ||W_l[:, j]||_2
//   dloss/dW_l[i, j] = W_l[i, j] * ((g * lambda_l) / ||W_l[:, j]||),  0 for an all-zero column
// (torch.linalg.vector_norm's backward: self * (grad / norm).masked_fill_(norm == 0, 0)).
#pragma once

#include <cstdint>

#include "codeq/common.h"

#ifndef CODEQ_DEVICE_CODE
#include <cmath>
#endif

namespace codeq {
namespace gl {

template <typename CT>
CODEQ_HD CT column_scale(CT g_lambda, CT norm) {
  return norm == CT(0) ? CT(0) : g_lambda / norm;
}

#ifndef CODEQ_DEVICE_CODE
// The CPU's summation order of the column norms, shared by group_lasso_forward
// and the fused dead-zone forward so that the two give the same bits: columns in
// blocks of kColBlock (one task each, their lambda-weighted norm sums added in
// task order), rows in blocks of row_block(cols) (each block's squares summed
// from zero, then the blocks added in order), squares in double.
constexpr int64_t kColBlock = 256;
constexpr int64_t kRowBlockElems = int64_t(1) << 15;

inline int64_t row_block(int64_t cols) { return cols >= kRowBlockElems ? 1 : kRowBlockElems / (cols > 0 ? cols : 1); }

template <typename scalar_t, typename CT>
inline void add_squares(const scalar_t* __restrict row, double* __restrict acc, int64_t width) {
  for (int64_t j = 0; j < width; ++j) {
    const double v = static_cast<double>(static_cast<CT>(row[j]));
    acc[j] += v * v;
  }
}

// norms[j] = sqrt(acc[j]) in CT; returns the sum of the norms (double, in order).
template <typename CT>
inline double block_norms(const double* acc, CT* norms, int64_t width) {
  double sum = 0.0;
  for (int64_t j = 0; j < width; ++j) {
    norms[j] = static_cast<CT>(std::sqrt(acc[j]));
    sum += static_cast<double>(norms[j]);
  }
  return sum;
}
#endif

}  // namespace gl
}  // namespace codeq
