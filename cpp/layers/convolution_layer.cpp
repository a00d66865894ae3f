#include "layers/convolution_layer.hpp"

#include <caffe/util/im2col.hpp>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "gemm.hpp"

namespace fastsal::layers {

void batch_norm_affine(caffe::Layer<float>& norm, caffe::Layer<float>* scale, std::vector<float>* a,
                       std::vector<float>* c) {
  const auto& blobs = norm.blobs();
  const float factor = blobs[2]->cpu_data()[0] == 0.f ? 0.f : 1.f / blobs[2]->cpu_data()[0];
  const float eps = norm.layer_param().batch_norm_param().eps();
  const int channels = blobs[0]->count();
  a->resize(channels), c->resize(channels);
  for (int i = 0; i < channels; ++i) {
    const float mean = blobs[0]->cpu_data()[i] * factor, variance = blobs[1]->cpu_data()[i] * factor;
    (*a)[i] = 1.f / std::sqrt(variance + eps);
    (*c)[i] = -mean * (*a)[i];
  }
  if (!scale) return;
  const float* gamma = scale->blobs()[0]->cpu_data();
  const float* beta = scale->blobs().size() > 1 ? scale->blobs()[1]->cpu_data() : nullptr;
  for (int i = 0; i < channels; ++i) {
    (*a)[i] *= gamma[i];
    (*c)[i] = (*c)[i] * gamma[i] + (beta ? beta[i] : 0.f);
  }
}

LinearOps RuleConvolutionLayer::ops(const caffe::Blob<float>& bottom, const caffe::Blob<float>& top) {
  LinearOps ops;
  ops.outputs = this->num_output_;
  ops.weight_count = this->blobs_[0]->count();
  ops.in_count = bottom.count();
  ops.out_count = top.count();
  ops.in_per_image = this->bottom_dim_;
  const int images = this->num_;
  const std::int64_t bottom_dim = this->bottom_dim_, top_dim = this->top_dim_;
  const std::int64_t spatial = this->out_spatial_dim_;
  if (this->num_spatial_axes_ != 2 || this->force_nd_im2col_) {  // Caffe's own products (N-d im2col)
    ops.forward = [this, images, bottom_dim, top_dim, spatial](const float* x, const float* w, const float* b,
                                                               float* z) {
      for (int n = 0; n < images; ++n) {
        float* out = z + n * top_dim;
        this->forward_cpu_gemm(x + n * bottom_dim, w, out);
        if (b)
          for (int o = 0; o < this->num_output_; ++o)
            for (std::int64_t p = 0; p < spatial; ++p) out[o * spatial + p] += b[o];
      }
    };
    ops.backward_data = [this, images, bottom_dim, top_dim](const float* s, const float* w, float* c) {
      for (int n = 0; n < images; ++n) this->backward_cpu_gemm(s + n * top_dim, w, c + n * bottom_dim);
    };
    return ops;
  }
  // 2-D: Caffe's im2col and col2im around fastsal's GEMM (gemm.hpp: on fastsal's threads, Caffe's sums).
  const int groups = this->group_, outputs = this->num_output_ / groups;
  const int kernel_dim = this->blobs_[0]->count(1);
  const int* input_shape = this->conv_input_shape_.cpu_data();
  const int* kernel = this->kernel_shape_.cpu_data();
  const int* pad = this->pad_.cpu_data();
  const int* stride = this->stride_.cpu_data();
  const int* dilation = this->dilation_.cpu_data();
  const int channels = this->channels_, height = input_shape[1], width = input_shape[2];
  const bool one_by_one = this->is_1x1_;
  const std::int64_t column_floats = std::int64_t(kernel_dim) * groups * spatial;
  columns_.resize(one_by_one ? 0 : column_floats);
  float* columns = columns_.data();
  const auto im2col = [=](const float* data) {
    caffe::im2col_cpu(data, channels, height, width, kernel[0], kernel[1], pad[0], pad[1], stride[0],
                      stride[1], dilation[0], dilation[1], columns);
  };
  ops.forward = [=](const float* x, const float* w, const float* b, float* z) {
    for (int n = 0; n < images; ++n) {
      const float* col = x + n * bottom_dim;
      if (!one_by_one) im2col(col), col = columns;
      float* out = z + n * top_dim;
      for (int g = 0; g < groups; ++g)
        gemm(false, false, outputs, spatial, kernel_dim, 1.f, w + std::int64_t(g) * outputs * kernel_dim,
             col + std::int64_t(g) * kernel_dim * spatial, 0.f, out + std::int64_t(g) * outputs * spatial);
      if (b)
        for (int o = 0; o < groups * outputs; ++o)
          for (std::int64_t p = 0; p < spatial; ++p) out[o * spatial + p] += b[o];
    }
  };
  ops.backward_data = [=](const float* s, const float* w, float* c) {
    for (int n = 0; n < images; ++n) {
      float* col = one_by_one ? c + n * bottom_dim : columns;
      for (int g = 0; g < groups; ++g)
        gemm(true, false, kernel_dim, spatial, outputs, 1.f, w + std::int64_t(g) * outputs * kernel_dim,
             s + n * top_dim + std::int64_t(g) * outputs * spatial, 0.f,
             col + std::int64_t(g) * kernel_dim * spatial);
      if (!one_by_one)
        caffe::col2im_cpu(columns, channels, height, width, kernel[0], kernel[1], pad[0], pad[1], stride[0],
                          stride[1], dilation[0], dilation[1], c + n * bottom_dim);
    }
  };
  return ops;
}

void RuleConvolutionLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                       const std::vector<caffe::Blob<float>*>& top) {
  if (bottom.size() != 1) throw std::invalid_argument("an LRP rule needs a convolution with one input");
  const LinearOps o = ops(*bottom[0], *top[0]);
  // Caffe's forward through the same products (gemm.hpp gives Caffe's sums, bit for bit, on fastsal's
  // threads: OpenBLAS's own pool would fight them); its output is also the rule's z unless BN is merged.
  const float* w = this->blobs_[0]->cpu_data();
  o.forward(bottom[0]->cpu_data(), w, this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr,
            top[0]->mutable_cpu_data());
  if (!rule_.prepared()) {  // once: the weights the rule uses
    std::vector<float> scale, shift;
    if (norm_) batch_norm_affine(*norm_, scale_, &scale, &shift);
    rule_.prepare(o, w, this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr, scale, shift);
  }
  rule_.forward(o, bottom[0]->cpu_data(), norm_ ? nullptr : top[0]->cpu_data());
}

void RuleConvolutionLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                        const std::vector<bool>& propagate_down,
                                        const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  rule_.backward(ops(*bottom[0], *top[0]), bottom[0]->cpu_data(), top[0]->cpu_diff(),
                 bottom[0]->mutable_cpu_diff());
}

std::int64_t RuleConvolutionLayer::rule_floats_per_image() const {
  return rule_.floats_per_image(this->bottom_dim_, this->top_dim_);
}

}  // namespace fastsal::layers
