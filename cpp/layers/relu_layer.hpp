// ReLU with a byte mask of the forward's signs for its backward, and the ReLU whose backward follows an
// attribution rule (guided backprop, deconvnet) instead of the gradient.
#pragma once

#include <caffe/layers/relu_layer.hpp>
#include <cstdint>
#include <vector>

namespace fastsal::layers {

class ReLULayer : public caffe::ReLULayer<float> {
 public:
  using caffe::ReLULayer<float>::ReLULayer;

  bool plain() const { return slope() == 0.f; }
  // The convolution below applies it (SaliencyNet::fuse_relus, forward-only nets): the forward then does
  // nothing, and there is no backward to keep a mask for.
  void skip_forward() { skip_forward_ = true; }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  float slope() const { return this->layer_param_.relu_param().negative_slope(); }
  std::vector<std::uint8_t> positive_;  // x > 0, from the forward pass every backward pass follows
  bool skip_forward_ = false;
};

// A ReLU whose backward follows an attribution rule instead of the gradient, as Captum's hooks on
// nn.ReLU do: guided backprop g * (x > 0) * (g > 0), deconvnet g * (g > 0). Forward is Caffe's. Only
// plain ReLUs get it (leaky ones keep their gradient, as Captum leaves nn.LeakyReLU alone).
class RuleReLULayer : public caffe::ReLULayer<float> {
 public:
  RuleReLULayer(const caffe::LayerParameter& param, bool guided)
      : caffe::ReLULayer<float>(param), guided_(guided) {}

 protected:
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;
#ifdef FASTSAL_WITH_CUDA
  void Backward_gpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;
#endif

 private:
  bool guided_;
};

}  // namespace fastsal::layers
