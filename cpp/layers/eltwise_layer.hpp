// Caffe's Eltwise layer with its plain sum (ResNet's shortcut) spread over the cores, cache-sized chunks
// at a time.
#pragma once

#include <algorithm>
#include <caffe/layers/eltwise_layer.hpp>
#include <vector>

namespace fastsal::layers {

// Element-wise sum with unit coefficients (ResNet's shortcut): ((0 + a) + b) + ..., and the diff
// copied to every input, as Caffe's axpy and copy give them.
class EltwiseLayer : public caffe::EltwiseLayer<float> {
 public:
  using caffe::EltwiseLayer<float>::EltwiseLayer;

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool plain_sum() const {
    return this->op_ == caffe::EltwiseParameter_EltwiseOp_SUM &&
           std::all_of(this->coeffs_.begin(), this->coeffs_.end(), [](float c) { return c == 1.f; });
  }
};

// Element-wise sum whose backward follows zennit's Norm rule (its canonizers' residual Sum): each input's
// share of the relevance in proportion to its contribution, R_i = c_i x_i R / stabilize(sum_j c_j x_j).
// Products and maxima keep their gradient. Forward is Caffe's.
class RuleEltwiseLayer : public caffe::EltwiseLayer<float> {
 public:
  RuleEltwiseLayer(const caffe::LayerParameter& param, float stabilizer)
      : caffe::EltwiseLayer<float>(param), stabilizer_(stabilizer) {}

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  float stabilizer_;
  std::vector<float> denominator_;  // the stabilized sum of the last forward (an in-place ReLU may follow)
};

}  // namespace fastsal::layers
