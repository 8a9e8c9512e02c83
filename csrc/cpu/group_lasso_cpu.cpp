// CPU kernels of the multi-tensor group lasso: every layer of a model in one
// call, parallel over (layer, column block) tasks.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "codeq/ops.h"
#include "codeq/group_lasso.h"

namespace codeq {
namespace cpu {
namespace {

constexpr int64_t kColBlock = gl::kColBlock;

struct Task {
  int64_t layer, c0, c1;
};

void check_layers(at::TensorList weights, at::ArrayRef<double> lambdas, const char* op) {
  check_group_lasso_layers(weights, lambdas, op);
  TORCH_CHECK(weights.empty() || weights[0].device().is_cpu(), "codeq.", op, ": the weights are not on the CPU");
}

std::vector<Task> make_tasks(const std::vector<at::Tensor>& ws) {
  std::vector<Task> tasks;
  for (size_t l = 0; l < ws.size(); ++l) {
    const int64_t cols = ws[l].size(0) == 0 ? 0 : ws[l].numel() / ws[l].size(0);
    for (int64_t c = 0; c < cols; c += kColBlock) tasks.push_back({(int64_t)l, c, std::min(cols, c + kColBlock)});
  }
  return tasks;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> group_lasso_forward_cpu(at::TensorList weights,
                                                                       at::ArrayRef<double> lambdas) {
  check_layers(weights, lambdas, "group_lasso_forward");
  std::vector<at::Tensor> ws, norms;
  for (const auto& w : weights) {
    ws.push_back(w.contiguous());
    const auto ct = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    norms.push_back(at::empty({w.size(0) == 0 ? 0 : w.numel() / w.size(0)}, w.options().dtype(ct)));
  }
  const auto tasks = make_tasks(ws);
  std::vector<double> task_sum(tasks.size(), 0.0);
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(kColBlock), part(kColBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const at::Tensor& w = ws[task.layer];
      const int64_t rows = w.size(0), cols = w.numel() / rows, width = task.c1 - task.c0;
      std::fill(acc.begin(), acc.begin() + width, 0.0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "codeq_gl_fwd", [&] {
        using CT = typename AccType<scalar_t>::type;
        const scalar_t* p = w.const_data_ptr<scalar_t>();
        // Rows in blocks of gl::row_block(cols), each summed from zero and then
        // added in order: the order of the fused dead-zone forward
        // (deadzone_forward_multi on the CPU), so both give the same bits.
        const int64_t rb = gl::row_block(cols);
        for (int64_t r0 = 0; r0 < rows; r0 += rb) {
          const int64_t r1 = std::min(rows, r0 + rb);
          std::fill(part.begin(), part.begin() + width, 0.0);
          for (int64_t i = r0; i < r1; ++i)
            gl::add_squares<scalar_t, CT>(p + i * cols + task.c0, part.data(), width);
          for (int64_t j = 0; j < width; ++j) acc[j] += part[j];
        }
        CT* np = norms[task.layer].mutable_data_ptr<CT>() + task.c0;
        task_sum[t] = gl::block_norms<CT>(acc.data(), np, width) * lambdas[task.layer];
      });
    }
  });
  double total = 0.0;  // summed in task order: deterministic
  for (double v : task_sum) total += v;
  const auto dt = loss_dtype(weights);
  auto opts = weights.empty() ? at::TensorOptions().dtype(dt) : weights[0].options().dtype(dt);
  return {at::scalar_tensor(total, opts), norms};
}

std::vector<at::Tensor> group_lasso_backward_cpu(const at::Tensor& grad, at::TensorList weights, at::TensorList norms,
                                                 at::ArrayRef<double> lambdas) {
  check_layers(weights, lambdas, "group_lasso_backward");
  TORCH_CHECK(norms.size() == weights.size(), "codeq.group_lasso_backward: got ", norms.size(), " norms for ",
              weights.size(), " weights");
  TORCH_CHECK(grad.numel() == 1, "codeq.group_lasso_backward: grad must be a one-element tensor");
  const double g = grad.item<double>();
  std::vector<at::Tensor> ws, ns, outs;
  for (size_t l = 0; l < weights.size(); ++l) {
    ws.push_back(weights[l].contiguous());
    ns.push_back(norms[l].contiguous());
    TORCH_CHECK(ns[l].numel() * std::max<int64_t>(weights[l].size(0), 1) == weights[l].numel() || weights[l].numel() == 0,
                "codeq.group_lasso_backward: norms[", l, "] does not match weights[", l, "]");
    outs.push_back(at::empty_like(ws[l]));
  }
  const auto tasks = make_tasks(ws);
  at::parallel_for(0, (int64_t)tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> scale_buf(kColBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = tasks[t];
      const at::Tensor& w = ws[task.layer];
      const int64_t rows = w.size(0), cols = w.numel() / rows, width = task.c1 - task.c0;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "codeq_gl_bwd", [&] {
        using CT = typename AccType<scalar_t>::type;
        const CT g_lambda = static_cast<CT>(static_cast<CT>(g) * static_cast<CT>(lambdas[task.layer]));
        const CT* np = ns[task.layer].const_data_ptr<CT>() + task.c0;
        CT* scale = reinterpret_cast<CT*>(scale_buf.data());
        for (int64_t j = 0; j < width; ++j) scale[j] = gl::column_scale<CT>(g_lambda, np[j]);
        const scalar_t* p = w.const_data_ptr<scalar_t>();
        scalar_t* o = outs[task.layer].mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t off = i * cols + task.c0;
          for (int64_t j = 0; j < width; ++j) o[off + j] = static_cast<scalar_t>(static_cast<CT>(p[off + j]) * scale[j]);
        }
      });
    }
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(codeq, CPU, m) {
  m.impl("group_lasso_forward", &group_lasso_forward_cpu);
  m.impl("group_lasso_backward", &group_lasso_backward_cpu);
}

}  // namespace cpu
}  // namespace codeq
