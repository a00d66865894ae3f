// Caffe's InnerProduct layer through fastsal's products: gemm.hpp's (Caffe's, on fastsal's threads) or
// inner_product.hpp's streaming ones.
#pragma once

#include <caffe/layers/inner_product_layer.hpp>
#include <vector>

namespace fastsal::layers {

// Fully connected layers through inner_product.hpp's streaming products: the data backward always (its
// order of summation is free: the forward's masks are fixed), the forward only when not exact.
class InnerProductLayer : public caffe::InnerProductLayer<float> {
 public:
  InnerProductLayer(const caffe::LayerParameter& param, bool forward)
      : caffe::InnerProductLayer<float>(param), streamed_forward_(forward) {}

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool streamed_forward_;
  std::vector<float> ones_;
};

}  // namespace fastsal::layers
