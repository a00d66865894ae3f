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
__global__ void channel_absmax_kernel(const float* gradient, ChannelAbsMaxLayout layout, float* out) {
  for (std::ptrdiff_t i = blockIdx.x * static_cast<std::ptrdiff_t>(blockDim.x) + threadIdx.x;
       i < layout.size(); i += static_cast<std::ptrdiff_t>(blockDim.x) * gridDim.x)
    out[layout.out_index(i)] = channel_absmax_at(gradient, layout, i);
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

void channel_absmax_gpu(const float* gradient, const ChannelAbsMaxLayout& layout, float* out) {
  if (layout.size() == 0) return;
  channel_absmax_kernel<<<blocks_for(layout.size()), kThreads>>>(gradient, layout, out);
  check_cuda("channel_absmax_kernel");
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
