#include "layers/inner_product_layer.hpp"

#include <vector>

#include "gemm.hpp"
#include "inner_product.hpp"

namespace fastsal::layers {

void InnerProductLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                    const std::vector<caffe::Blob<float>*>& top) {
  if (this->transpose_) return caffe::InnerProductLayer<float>::Forward_cpu(bottom, top);
  if (!streamed_forward_) {  // Caffe's products, on fastsal's threads
    gemm(false, true, this->M_, this->N_, this->K_, 1.f, bottom[0]->cpu_data(), this->blobs_[0]->cpu_data(),
         0.f, top[0]->mutable_cpu_data());
    if (this->bias_term_) {
      if (int(ones_.size()) != this->M_) ones_.assign(this->M_, 1.f);  // Caffe's bias_multiplier_
      gemm(false, false, this->M_, this->N_, 1, 1.f, ones_.data(), this->blobs_[1]->cpu_data(), 1.f,
           top[0]->mutable_cpu_data());
    }
    return;
  }
  inner_product_forward(this->M_, this->K_, this->N_, bottom[0]->cpu_data(), this->blobs_[0]->cpu_data(),
                        this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr, top[0]->mutable_cpu_data());
}

void InnerProductLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                     const std::vector<bool>& propagate_down,
                                     const std::vector<caffe::Blob<float>*>& bottom) {
  const bool weight_gradients =
      this->param_propagate_down_[0] || (this->bias_term_ && this->param_propagate_down_[1]);
  if (weight_gradients || this->transpose_)
    return caffe::InnerProductLayer<float>::Backward_cpu(top, propagate_down, bottom);
  if (propagate_down[0])
    inner_product_backward(this->M_, this->K_, this->N_, top[0]->cpu_diff(), this->blobs_[0]->cpu_data(),
                           bottom[0]->mutable_cpu_diff());
}

}  // namespace fastsal::layers
