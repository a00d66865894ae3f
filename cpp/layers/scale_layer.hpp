// Caffe's Scale layer for one learned factor per channel, spread over the cores, and foldable into the
// convolution below it (SaliencyNet::fold_batch_norm).
#pragma once

#include <algorithm>
#include <caffe/layers/scale_layer.hpp>
#include <vector>

namespace fastsal::layers {

// Scale by a learned per-channel factor, then Caffe's bias, and the data backward diff * factor; without
// the copy of the input Caffe keeps for the factor's gradient.
class ScaleLayer : public caffe::ScaleLayer<float> {
 public:
  using caffe::ScaleLayer<float>::ScaleLayer;

  // One learned factor per channel of a 4-axis blob, without parameter gradients: foldable.
  bool per_channel(int channels) const {
    return this->blobs_.size() >= 1 && this->scale_dim_ == channels && this->outer_dim_ >= 1 &&
           this->inner_dim_ >= 1 && this->blobs_[0]->count() == channels && !parameter_gradients();
  }
  const float* factors() const { return this->blobs_[0]->cpu_data(); }
  const float* bias() const {
    return this->bias_layer_ ? this->blobs_[this->bias_param_id_]->cpu_data() : nullptr;
  }
  void fold(bool forward, bool backward) { folded_forward_ = forward, folded_backward_ = backward; }
  bool folded() const { return folded_forward_ && folded_backward_; }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool parameter_gradients() const {
    return std::any_of(this->param_propagate_down_.begin(), this->param_propagate_down_.end(),
                       [](bool b) { return b; });
  }

  bool folded_forward_ = false, folded_backward_ = false;
};

}  // namespace fastsal::layers
