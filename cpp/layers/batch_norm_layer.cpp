#include "layers/batch_norm_layer.hpp"

#include <cmath>
#include <cstdint>
#include <vector>

#include "layers/parallel.hpp"

namespace fastsal::layers {

void BatchNormLayer::statistics(std::vector<float>* mean, std::vector<float>* deviation) const {
  const float stored = this->blobs_[2]->cpu_data()[0];
  const float factor = stored == 0 ? 0 : 1 / stored;
  mean->resize(this->channels_), deviation->resize(this->channels_);
  for (int c = 0; c < this->channels_; ++c) {
    (*mean)[c] = factor * this->blobs_[0]->cpu_data()[c];
    float variance = factor * this->blobs_[1]->cpu_data()[c];
    variance += this->eps_;
    (*deviation)[c] = std::sqrt(variance);
  }
}

void BatchNormLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                 const std::vector<caffe::Blob<float>*>& top) {
  if (!this->use_global_stats_) return caffe::BatchNormLayer<float>::Forward_cpu(bottom, top);
  if (folded_forward_) return;  // the convolution below computed this layer's output
  statistics(&mean_of_, &deviation_);
  const float* x = bottom[0]->cpu_data();
  float* y = top[0]->mutable_cpu_data();
  const int channels = this->channels_;
  const std::int64_t plane = bottom[0]->count() / (std::int64_t(bottom[0]->shape(0)) * channels);
  parallel_for(std::int64_t(bottom[0]->shape(0)) * channels, [&](std::int64_t p) {
    const float m = mean_of_[p % channels], d = deviation_[p % channels];
    for (std::int64_t i = p * plane; i < (p + 1) * plane; ++i) {
      const float centred = x[i] - m;
      y[i] = centred / d;
    }
  });
}

void BatchNormLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                  const std::vector<bool>& propagate_down,
                                  const std::vector<caffe::Blob<float>*>& bottom) {
  if (!this->use_global_stats_)
    return caffe::BatchNormLayer<float>::Backward_cpu(top, propagate_down, bottom);
  if (folded_backward_) return;  // in place: the convolution below applies this layer's factor
  if (folded_forward_) statistics(&mean_of_, &deviation_);  // the forward skipped them
  const float* g = top[0]->cpu_diff();
  float* out = bottom[0]->mutable_cpu_diff();
  const int channels = this->channels_;
  const std::int64_t plane = bottom[0]->count() / (std::int64_t(bottom[0]->shape(0)) * channels);
  parallel_for(std::int64_t(bottom[0]->shape(0)) * channels, [&](std::int64_t p) {
    const float d = deviation_[p % channels];
    for (std::int64_t i = p * plane; i < (p + 1) * plane; ++i) out[i] = g[i] / d;
  });
}

}  // namespace fastsal::layers
