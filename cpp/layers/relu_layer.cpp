#include "layers/relu_layer.hpp"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "channel_reduce.hpp"
#ifdef FASTSAL_WITH_CUDA
#include "cuda_kernels.hpp"
#endif

namespace fastsal::layers {

namespace {

// ReLU as Caffe computes it, plus a byte mask of x > 0 written while the data is hot. Caffe's backward
// re-reads x (cold by then, and once per class) in a scalar loop; the mask is a quarter of that.
// Caffe's expressions, term for term, so every value (NaN and Inf included) matches Caffe's layer.
void relu_forward(const float* bottom_data, float* top_data, std::uint8_t* positive, std::int64_t count,
                  float negative_slope) {
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) {
    const float x = bottom_data[i];
    positive[i] = x > 0.f;
    top_data[i] = std::max(x, 0.f) + negative_slope * std::min(x, 0.f);
  }
}

void relu_backward(const std::uint8_t* positive, const float* top_diff, float* bottom_diff,
                   std::int64_t count) {
  // Caffe's factor (x > 0) + 0 * (x <= 0), multiplied so that Inf/NaN diffs propagate as in Caffe.
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) bottom_diff[i] = top_diff[i] * static_cast<float>(positive[i]);
}

}  // namespace

void ReLULayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                            const std::vector<caffe::Blob<float>*>& top) {
  if (skip_forward_) return;
  const std::int64_t count = bottom[0]->count();
  positive_.resize(count);
  relu_forward(bottom[0]->cpu_data(), top[0]->mutable_cpu_data(), positive_.data(), count, slope());
}

void ReLULayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                             const std::vector<bool>& propagate_down,
                             const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  if (slope() != 0.f)  // leaky: Caffe's own code (the mask alone cannot tell x <= 0 from NaN)
    return caffe::ReLULayer<float>::Backward_cpu(top, propagate_down, bottom);
  relu_backward(positive_.data(), top[0]->cpu_diff(), bottom[0]->mutable_cpu_diff(), bottom[0]->count());
}

void RuleReLULayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                 const std::vector<bool>& propagate_down,
                                 const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  const float* x = bottom[0]->cpu_data();  // in place, this is max(x, 0): the same sign test
  const float* g = top[0]->cpu_diff();
  float* out = bottom[0]->mutable_cpu_diff();
  const std::int64_t count = bottom[0]->count();
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) out[i] = relu_rule_backward(g[i], x[i], guided_);
}

#ifdef FASTSAL_WITH_CUDA
void RuleReLULayer::Backward_gpu(const std::vector<caffe::Blob<float>*>& top,
                                 const std::vector<bool>& propagate_down,
                                 const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  relu_rule_backward_gpu(bottom[0]->gpu_data(), top[0]->gpu_diff(), bottom[0]->mutable_gpu_diff(),
                         bottom[0]->count(), guided_);
}
#endif

}  // namespace fastsal::layers
