// Caffe's pooling with a max pooling whose backward never indexes out of bounds: a safety swap, always in
// fastsal's net.
#pragma once

#include <caffe/layers/pooling_layer.hpp>
#include <cstdint>
#include <vector>

namespace fastsal::layers {

// Caffe's max pooling keeps index -1 for a window holding no number above -FLT_MAX (all NaN or -Inf,
// as when activations overflow) and its CPU backward then writes before the plane: heap corruption.
// This one skips such windows, records the first row that had one (the engine refuses that image),
// and spreads the backward over (image, channel) planes. Its GPU code is Caffe's, which gathers per
// bottom element and so never indexes with -1. Forward is Caffe's own.
class PoolingLayer : public caffe::PoolingLayer<float> {
 public:
  using caffe::PoolingLayer<float>::PoolingLayer;

  int overflowed_row() const { return overflowed_row_; }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool is_max() const {
    return this->layer_param_.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_MAX;
  }
  // Caffe's max pooling forward over (image, channel) planes; each plane notes whether it had a window
  // of nothing above -FLT_MAX while it is hot.
  void max_forward(const caffe::Blob<float>& bottom, caffe::Blob<float>& top);

  std::vector<std::uint8_t> empty_window_;  // per (image, channel) plane of the last forward
  int overflowed_row_ = -1;
};

// Average pooling whose backward follows zennit's Norm rule: R_in = x * avg_backward(R / stabilize(avg(x))).
// Max pooling keeps its gradient (the winner takes all). Forward and safety are PoolingLayer's.
class RulePoolingLayer : public PoolingLayer {
 public:
  RulePoolingLayer(const caffe::LayerParameter& param, float stabilizer)
      : PoolingLayer(param), stabilizer_(stabilizer) {}

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool average() const {
    return this->layer_param_.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_AVE;
  }
  float stabilizer_;
  std::vector<float> denominator_;
};

}  // namespace fastsal::layers
