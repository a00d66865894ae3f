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

LinearOps RuleInnerProductLayer::ops() const {
  LinearOps ops;
  const int m = this->M_, k = this->K_, n = this->N_;
  const bool transposed = this->transpose_;  // W stored (K, N) instead of (N, K)
  ops.outputs = n;
  ops.weight_count = std::int64_t(n) * k;
  ops.images = m;
  ops.in_per_image = k;
  ops.out_per_image = n;
  ops.geometry = {k, n};
  if (transposed) {
    ops.forward = [m, k, n](const float* x, const float* w, const float* b, float* z) {
      gemm(false, false, m, n, k, 1.f, x, w, 0.f, z);
      if (b)
        for (int r = 0; r < m; ++r)
          for (int j = 0; j < n; ++j) z[std::int64_t(r) * n + j] += b[j];
    };
    ops.backward_data = [m, k, n](const float* s, const float* w, float* c) {
      gemm(false, true, m, k, n, 1.f, s, w, 0.f, c);
    };
    return ops;
  }
  // W read once per call, not packed first (inner_product.hpp): the rule's products are not Caffe's forward
  ops.forward = [m, k, n](const float* x, const float* w, const float* b, float* z) {
    inner_product_forward(m, k, n, x, w, b, z);
  };
  ops.backward_data = [m, k, n](const float* s, const float* w, float* c) {
    inner_product_backward(m, k, n, s, w, c);
  };
  return ops;
}

void RuleInnerProductLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                        const std::vector<caffe::Blob<float>*>& top) {
  caffe::InnerProductLayer<float>::Forward_cpu(bottom, top);
  const LinearOps o = ops();
  if (!rule_.prepared())  // once: the weights the rule uses
    rule_.prepare(o, this->blobs_[0]->cpu_data(), this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr,
                  {}, {});
  rule_.forward(o, bottom[0]->cpu_data(), top[0]->cpu_data());
}

void RuleInnerProductLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                         const std::vector<bool>& propagate_down,
                                         const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  rule_.backward(ops(), bottom[0]->cpu_data(), top[0]->cpu_diff(), bottom[0]->mutable_cpu_diff());
}

}  // namespace fastsal::layers
