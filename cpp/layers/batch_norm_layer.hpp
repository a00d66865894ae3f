// Test-time BatchNorm as Caffe rounds it, spread over the cores, and foldable into the convolution below
// it (SaliencyNet::fold_batch_norm).
#pragma once

#include <caffe/layers/batch_norm_layer.hpp>
#include <vector>

namespace fastsal::layers {

// Test-time batch normalisation: (x - mean / s) / sqrt(var / s + eps) per channel, and its data backward
// diff / sqrt(var / s + eps), as Caffe rounds them; without Caffe's copy of the output for training.
class BatchNormLayer : public caffe::BatchNormLayer<float> {
 public:
  using caffe::BatchNormLayer<float>::BatchNormLayer;

  bool global_statistics() const { return this->use_global_stats_; }
  // Per channel, the stored mean and sqrt(var + eps), as Caffe scales and rounds them.
  void statistics(std::vector<float>* mean, std::vector<float>* deviation) const;
  // Folded into the convolution below it (SaliencyNet::fold_batch_norm): this layer then does nothing.
  void fold(bool forward, bool backward) { folded_forward_ = forward, folded_backward_ = backward; }
  bool folded() const { return folded_forward_ && folded_backward_; }  // in every pass that runs

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  std::vector<float> mean_of_, deviation_;  // per channel, from the forward every backward follows
  bool folded_forward_ = false, folded_backward_ = false;
};

}  // namespace fastsal::layers
