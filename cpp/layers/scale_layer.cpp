#include "layers/scale_layer.hpp"

#include <cstdint>
#include <vector>

#include "layers/parallel.hpp"

namespace fastsal::layers {

void ScaleLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                             const std::vector<caffe::Blob<float>*>& top) {
  if (bottom.size() > 1) return caffe::ScaleLayer<float>::Forward_cpu(bottom, top);
  if (folded_forward_) return;
  const float* scale = factors();
  const float* bias = this->bias();
  const float* x = bottom[0]->cpu_data();
  float* y = top[0]->mutable_cpu_data();
  const int dim = this->scale_dim_;
  const std::int64_t inner = this->inner_dim_;
  parallel_for(std::int64_t(this->outer_dim_) * dim, [&](std::int64_t p) {
    const float s = scale[p % dim], b = bias ? bias[p % dim] : 0.f;
    for (std::int64_t i = p * inner; i < (p + 1) * inner; ++i) {
      const float scaled = x[i] * s;
      y[i] = bias ? scaled + b : scaled;
    }
  });
}

void ScaleLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                              const std::vector<bool>& propagate_down,
                              const std::vector<caffe::Blob<float>*>& bottom) {
  if (bottom.size() > 1 || parameter_gradients())
    return caffe::ScaleLayer<float>::Backward_cpu(top, propagate_down, bottom);
  if (!propagate_down[0] || folded_backward_) return;
  const float* scale = factors();
  const float* g = top[0]->cpu_diff();
  float* out = bottom[0]->mutable_cpu_diff();
  const int dim = this->scale_dim_;
  const std::int64_t inner = this->inner_dim_;
  parallel_for(std::int64_t(this->outer_dim_) * dim, [&](std::int64_t p) {
    const float s = scale[p % dim];
    for (std::int64_t i = p * inner; i < (p + 1) * inner; ++i) out[i] = g[i] * s;
  });
}

}  // namespace fastsal::layers
