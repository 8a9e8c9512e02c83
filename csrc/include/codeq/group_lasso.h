// Group lasso over the columns of W.reshape(out, -1), shared CPU/CUDA math.
//   loss = sum_l lambda_l * sum_j ||W_l[:, j]||_2
//   dloss/dW_l[i, j] = W_l[i, j] * ((g * lambda_l) / ||W_l[:, j]||),  0 for an all-zero column
// (torch.linalg.vector_norm's backward: self * (grad / norm).masked_fill_(norm == 0, 0)).
#pragma once

#include "codeq/common.h"

namespace codeq {
namespace gl {

template <typename CT>
CODEQ_HD CT column_scale(CT g_lambda, CT norm) {
  return norm == CT(0) ? CT(0) : g_lambda / norm;
}

}  // namespace gl
}  // namespace codeq
