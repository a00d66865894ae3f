#include "layers/eltwise_layer.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "layers/lrp_rule.hpp"
#include "layers/parallel.hpp"

namespace fastsal::layers {

void EltwiseLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                               const std::vector<caffe::Blob<float>*>& top) {
  if (!plain_sum()) return caffe::EltwiseLayer<float>::Forward_cpu(bottom, top);
  std::vector<const float*> inputs;
  for (const caffe::Blob<float>* blob : bottom) inputs.push_back(blob->cpu_data());
  float* y = top[0]->mutable_cpu_data();
  in_chunks(top[0]->count(), [&](std::int64_t begin, std::int64_t end) {
    for (std::size_t b = 0; b < inputs.size(); ++b) {
      const float* x = inputs[b];
      const bool first = b == 0;
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) y[i] = (first ? 0.f : y[i]) + x[i];
    }
  });
}

void EltwiseLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                const std::vector<bool>& propagate_down,
                                const std::vector<caffe::Blob<float>*>& bottom) {
  if (!plain_sum()) return caffe::EltwiseLayer<float>::Backward_cpu(top, propagate_down, bottom);
  const float* g = top[0]->cpu_diff();
  std::vector<float*> outputs;
  for (std::size_t b = 0; b < bottom.size(); ++b)
    if (propagate_down[b]) outputs.push_back(bottom[b]->mutable_cpu_diff());
  in_chunks(top[0]->count(), [&](std::int64_t begin, std::int64_t end) {
    for (float* out : outputs) std::copy(g + begin, g + end, out + begin);
  });
}

void RuleEltwiseLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                   const std::vector<caffe::Blob<float>*>& top) {
  caffe::EltwiseLayer<float>::Forward_cpu(bottom, top);
  if (this->op_ != caffe::EltwiseParameter_EltwiseOp_SUM) return;
  const float* y = top[0]->cpu_data();
  denominator_.resize(top[0]->count());
  for (std::size_t i = 0; i < denominator_.size(); ++i) denominator_[i] = stabilize(y[i], stabilizer_);
}

void RuleEltwiseLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                    const std::vector<bool>& propagate_down,
                                    const std::vector<caffe::Blob<float>*>& bottom) {
  if (this->op_ != caffe::EltwiseParameter_EltwiseOp_SUM)
    return caffe::EltwiseLayer<float>::Backward_cpu(top, propagate_down, bottom);
  const float* r = top[0]->cpu_diff();
  const std::int64_t count = top[0]->count();
  for (std::size_t b = 0; b < bottom.size(); ++b) {
    if (!propagate_down[b]) continue;
    const float* x = bottom[b]->cpu_data();
    float* out = bottom[b]->mutable_cpu_diff();
    const float coefficient = this->coeffs_[b];
    for (std::int64_t i = 0; i < count; ++i) out[i] = (coefficient * x[i]) * (r[i] / denominator_[i]);
  }
}

}  // namespace fastsal::layers
