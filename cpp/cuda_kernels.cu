#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.hpp"

namespace fastsal {
namespace {

constexpr int kThreads = 256;

int blocks_for(std::ptrdiff_t n) {
  return static_cast<int>(std::min<std::ptrdiff_t>((n + kThreads - 1) / kThreads, 65535));
}

// Consecutive threads take consecutive pixels of one channel plane: coalesced reads.
__global__ void channel_reduce_kernel(const float* gradient, ChannelLayout layout, ChannelReduction op,
                                      float* out) {
  for (std::ptrdiff_t i = blockIdx.x * static_cast<std::ptrdiff_t>(blockDim.x) + threadIdx.x;
       i < layout.size(); i += static_cast<std::ptrdiff_t>(blockDim.x) * gridDim.x)
    out[layout.out_index(i)] = channel_reduce_at(gradient, layout, op, i);
}

__global__ void relu_rule_backward_kernel(const float* bottom_data, const float* top_diff, float* bottom_diff,
                                          std::int64_t count, bool guided) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(blockDim.x) * gridDim.x) {
    bottom_diff[i] = relu_rule_backward(top_diff[i], bottom_data[i], guided);
  }
}

// Grid-stride: blocks_for caps the grid at 65,535 blocks, and a batch may hold more rows than that covers.
__global__ void seed_one_hot_kernel(float* score_diff, int rows, int num_classes, const int* classes,
                                    int classes_stride, int class_offset) {
  for (int row = blockIdx.x * blockDim.x + threadIdx.x; row < rows; row += blockDim.x * gridDim.x)
    score_diff[seed_index(row, classes, num_classes, classes_stride, class_offset)] = 1.f;
}

}  // namespace

void check_cuda(const char* what) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(error));
}

void check_cuda_call(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  cudaGetLastError();
  throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

void channel_reduce_gpu(const float* gradient, const ChannelLayout& layout, ChannelReduction op, float* out) {
  if (layout.size() == 0) return;
  channel_reduce_kernel<<<blocks_for(layout.size()), kThreads>>>(gradient, layout, op, out);
  check_cuda("channel_reduce_kernel");
}

void relu_rule_backward_gpu(const float* bottom_data, const float* top_diff, float* bottom_diff,
                            std::int64_t count, bool guided) {
  if (count == 0) return;
  relu_rule_backward_kernel<<<blocks_for(count), kThreads>>>(bottom_data, top_diff, bottom_diff, count,
                                                             guided);
  check_cuda("relu_rule_backward_kernel");
}

void seed_one_hot_gpu(float* score_diff, int rows, int num_classes, const int* classes, int classes_stride,
                      int class_offset) {
  check_cuda_call(
      cudaMemsetAsync(score_diff, 0, sizeof(float) * rows * static_cast<std::size_t>(num_classes), 0),
      "zeroing the score diff");
  seed_one_hot_kernel<<<blocks_for(rows), kThreads>>>(score_diff, rows, num_classes, classes, classes_stride,
                                                      class_offset);
  check_cuda("seed_one_hot_kernel");
}

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error, report none
    return 0;
  }
  return count;
}

}  // namespace fastsal
