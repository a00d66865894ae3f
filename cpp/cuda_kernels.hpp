// fastsal's CUDA kernels, launched on the legacy default stream where Caffe runs, so they are ordered
// after its work with no extra synchronisation. Declared in plain C++; defined in cuda_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "channel_reduce.hpp"

namespace fastsal {

// out[layout.out_index(i)] = the channel reduction for every output pixel; all pointers device memory.
void channel_reduce_gpu(const float* gradient, const ChannelLayout& layout, ChannelReduction op, float* out);

// A ReLU's backward under an attribution rule: guided backprop g * (x > 0) * (g > 0), or (guided false)
// deconvnet g * (g > 0). All pointers device memory.
void relu_rule_backward_gpu(const float* bottom_data, const float* top_diff, float* bottom_diff,
                            std::int64_t count, bool guided);

// Zeroes the score diff (rows x num_classes) and writes a 1 at each row's seed_index.
void seed_one_hot_gpu(float* score_diff, int rows, int num_classes, const int* classes, int classes_stride,
                      int class_offset);

// Throws std::runtime_error naming what failed if the last CUDA call or launch failed.
void check_cuda(const char* what);

// Throws std::runtime_error naming what failed if `status` is an error (clearing it, so that the next
// call starts clean).
void check_cuda_call(cudaError_t status, const char* what);

int cuda_device_count();

}  // namespace fastsal
