#include "fast_layers.hpp"

#include <algorithm>
#include <caffe/layers/batch_norm_layer.hpp>
#include <caffe/layers/conv_layer.hpp>
#include <caffe/layers/eltwise_layer.hpp>
#include <caffe/layers/inner_product_layer.hpp>
#include <caffe/layers/pooling_layer.hpp>
#include <caffe/layers/relu_layer.hpp>
#include <caffe/layers/scale_layer.hpp>
#include <caffe/layers/split_layer.hpp>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#ifdef FASTSAL_WITH_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif
#include "channel_reduce.hpp"
#include "gemm.hpp"
#include "inner_product.hpp"
#ifdef FASTSAL_WITH_CUDA
#include "cuda_kernels.hpp"
#endif

namespace fastsal {

namespace {

// ReLU as Caffe computes it, plus a byte mask of x > 0 written while the data is hot. Caffe's backward
// re-reads x (cold by then, and once per class) in a scalar loop; the mask is a quarter of that.
// Caffe's expressions, term for term, so every value (NaN and Inf included) matches Caffe's layer.
void relu_forward(const float* bottom_data, float* top_data, std::uint8_t* positive, std::int64_t count,
                  float negative_slope) {
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) {
    const float x = bottom_data[i];
    positive[i] = x > 0.f;
    top_data[i] = std::max(x, 0.f) + negative_slope * std::min(x, 0.f);
  }
}

void relu_backward(const std::uint8_t* positive, const float* top_diff, float* bottom_diff,
                   std::int64_t count) {
  // Caffe's factor (x > 0) + 0 * (x <= 0), multiplied so that Inf/NaN diffs propagate as in Caffe.
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) bottom_diff[i] = top_diff[i] * static_cast<float>(positive[i]);
}

class ReLULayer : public caffe::ReLULayer<float> {
 public:
  using caffe::ReLULayer<float>::ReLULayer;

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override {
    const std::int64_t count = bottom[0]->count();
    positive_.resize(count);
    relu_forward(bottom[0]->cpu_data(), top[0]->mutable_cpu_data(), positive_.data(), count, slope());
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!propagate_down[0]) return;
    if (slope() != 0.f)  // leaky: Caffe's own code (the mask alone cannot tell x <= 0 from NaN)
      return caffe::ReLULayer<float>::Backward_cpu(top, propagate_down, bottom);
    relu_backward(positive_.data(), top[0]->cpu_diff(), bottom[0]->mutable_cpu_diff(), bottom[0]->count());
  }

 private:
  float slope() const { return this->layer_param_.relu_param().negative_slope(); }
  std::vector<std::uint8_t> positive_;  // x > 0, from the forward pass every backward pass follows
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
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!propagate_down[0]) return;
    const float* x = bottom[0]->cpu_data();  // in place, this is max(x, 0): the same sign test
    const float* g = top[0]->cpu_diff();
    float* out = bottom[0]->mutable_cpu_diff();
    const std::int64_t count = bottom[0]->count();
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
    for (std::int64_t i = 0; i < count; ++i) out[i] = relu_rule_backward(g[i], x[i], guided_);
  }

#ifdef FASTSAL_WITH_CUDA
  void Backward_gpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!propagate_down[0]) return;
    relu_rule_backward_gpu(bottom[0]->gpu_data(), top[0]->gpu_diff(), bottom[0]->mutable_gpu_diff(),
                           bottom[0]->count(), guided_);
  }
#endif

 private:
  bool guided_;
};

struct PoolingWindows {
  int height, width, pooled_h, pooled_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
};

// Caffe's max pooling forward on one plane, comparison for comparison: the first maximum in a window
// wins, and a window of nothing above -FLT_MAX keeps index -1 (the return value says whether one did).
// A whole output row at a time, one window offset (h, kw) after another: each window still sees its
// elements in Caffe's order (h, then w), and the loop over the row vectorises. Its strided loads need
// AVX2 or AVX-512 for that (on SSE2 alone it ran 2x slower than a window at a time, and 1.75x faster
// with AVX-512: pool1 of open_nsfw, 8 images), hence the clones, one picked when the library loads.
bool max_pool_plane(const float* in, float* out, int* index, const PoolingWindows& g)
    __attribute__((target_clones("avx512f", "avx2", "default")));
bool max_pool_plane(const float* in, float* out, int* index, const PoolingWindows& g) {
  bool empty = false;
  for (int ph = 0; ph < g.pooled_h; ++ph) {
    const int hstart = std::max(ph * g.stride_h - g.pad_h, 0);
    const int hend = std::min(ph * g.stride_h - g.pad_h + g.kernel_h, g.height);
    float* best = out + ph * g.pooled_w;
    int* best_index = index + ph * g.pooled_w;
    std::fill_n(best, g.pooled_w, -FLT_MAX);
    std::fill_n(best_index, g.pooled_w, -1);
    for (int h = hstart; h < hend; ++h)
      for (int kw = 0; kw < g.kernel_w; ++kw) {
        const int offset = kw - g.pad_w;  // w = pw * stride_w + offset, inside [0, width)
        if (offset >= g.width) break;     // the padding on the right (a kernel wider than the image)
        const int first = offset >= 0 ? 0 : (-offset + g.stride_w - 1) / g.stride_w;
        const int last = std::min(g.pooled_w - 1, (g.width - 1 - offset) / g.stride_w);
        const int stride = g.stride_w, base = h * g.width + offset;
        const float* row = in + base;
#pragma omp simd
        for (int pw = first; pw <= last; ++pw) {
          const float x = row[pw * stride];
          const bool above = x > best[pw];  // branch-free: which element wins is data
          best[pw] = above ? x : best[pw];
          best_index[pw] = above ? base + pw * stride : best_index[pw];
        }
      }
    for (int pw = 0; pw < g.pooled_w; ++pw) empty |= best_index[pw] < 0;
  }
  return empty;
}

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
                   const std::vector<caffe::Blob<float>*>& top) override {
    overflowed_row_ = -1;
    if (is_max() && top.size() == 1) return max_forward(*bottom[0], *top[0]);
    caffe::PoolingLayer<float>::Forward_cpu(bottom, top);
    if (!is_max()) return;
    const std::int64_t per_row = top[0]->count(1);
    const float* mask = top[1]->cpu_data();
    for (int n = 0; n < top[0]->shape(0) && overflowed_row_ < 0; ++n)
      if (std::any_of(mask + n * per_row, mask + (n + 1) * per_row, [](float i) { return i < 0; }))
        overflowed_row_ = n;
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!is_max()) return caffe::PoolingLayer<float>::Backward_cpu(top, propagate_down, bottom);
    if (!propagate_down[0]) return;
    const float* top_diff = top[0]->cpu_diff();
    float* bottom_diff = bottom[0]->mutable_cpu_diff();
    const int* mask = top.size() > 1 ? nullptr : this->max_idx_.cpu_data();
    const float* top_mask = top.size() > 1 ? top[1]->cpu_data() : nullptr;
    const std::int64_t planes = std::int64_t(top[0]->shape(0)) * this->channels_;
    const std::int64_t top_plane = std::int64_t(this->pooled_height_) * this->pooled_width_;
    const std::int64_t bottom_plane = std::int64_t(this->height_) * this->width_;
#pragma omp parallel for schedule(static) if (planes * bottom_plane >= (1 << 16))
    for (std::int64_t p = 0; p < planes; ++p) {
      float* diff = bottom_diff + p * bottom_plane;
      std::fill_n(diff, bottom_plane, 0.f);
      for (std::int64_t i = p * top_plane; i < (p + 1) * top_plane; ++i) {
        const int index = mask ? mask[i] : static_cast<int>(top_mask[i]);
        if (index >= 0) diff[index] += top_diff[i];
      }
    }
  }

 private:
  bool is_max() const {
    return this->layer_param_.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_MAX;
  }
  // Caffe's max pooling forward over (image, channel) planes; each plane notes whether it had a window
  // of nothing above -FLT_MAX while it is hot.
  void max_forward(const caffe::Blob<float>& bottom, caffe::Blob<float>& top) {
    const float* bottom_data = bottom.cpu_data();
    float* top_data = top.mutable_cpu_data();
    int* mask = this->max_idx_.mutable_cpu_data();
    const std::int64_t planes = std::int64_t(top.shape(0)) * this->channels_;
    const PoolingWindows windows{this->height_,   this->width_,    this->pooled_height_, this->pooled_width_,
                                 this->kernel_h_, this->kernel_w_, this->stride_h_,      this->stride_w_,
                                 this->pad_h_,    this->pad_w_};
    const std::int64_t top_plane = std::int64_t(windows.pooled_h) * windows.pooled_w,
                       bottom_plane = std::int64_t(windows.height) * windows.width;
    empty_window_.assign(planes, 0);
#pragma omp parallel for schedule(static) if (planes * bottom_plane >= (1 << 16))
    for (std::int64_t p = 0; p < planes; ++p)
      empty_window_[p] = max_pool_plane(bottom_data + p * bottom_plane, top_data + p * top_plane,
                                        mask + p * top_plane, windows);
    const auto first = std::find(empty_window_.begin(), empty_window_.end(), 1);
    if (first != empty_window_.end())
      overflowed_row_ = int((first - empty_window_.begin()) / this->channels_);
  }

  std::vector<std::uint8_t> empty_window_;  // per (image, channel) plane of the last forward
  int overflowed_row_ = -1;
};

// Caffe's per-element layers, term for term (this file is built without FMA contraction, so every
// product and sum rounds where Caffe's does), spread over the cores: Caffe runs them on one.
template <typename F>
void parallel_for(std::int64_t count, F body) {
#pragma omp parallel for schedule(static) if (count >= (1 << 15))
  for (std::int64_t i = 0; i < count; ++i) body(i);
}

// Test-time batch normalisation: (x - mean / s) / sqrt(var / s + eps) per channel, and its data backward
// diff / sqrt(var / s + eps), as Caffe rounds them; without Caffe's copy of the output for training.
class BatchNormLayer : public caffe::BatchNormLayer<float> {
 public:
  using caffe::BatchNormLayer<float>::BatchNormLayer;

  bool global_statistics() const { return this->use_global_stats_; }
  // Per channel, the stored mean and sqrt(var + eps), as Caffe scales and rounds them.
  void statistics(std::vector<float>* mean, std::vector<float>* deviation) const {
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
  // Folded into the convolution below it (SaliencyNet::fold_batch_norm): this layer then does nothing.
  void fold(bool forward, bool backward) { folded_forward_ = forward, folded_backward_ = backward; }
  bool folded() const { return folded_forward_ && folded_backward_; }  // in every pass that runs

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override {
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

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
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

 private:
  std::vector<float> mean_of_, deviation_;  // per channel, from the forward every backward follows
  bool folded_forward_ = false, folded_backward_ = false;
};

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
                   const std::vector<caffe::Blob<float>*>& top) override {
    if (bottom.size() > 1) return caffe::ScaleLayer<float>::Forward_cpu(bottom, top);
    if (folded_forward_) return;
    const float* scale = factors();
    const float* bias = this->bias();
    const float* x = bottom[0]->cpu_data();
    float* y = top[0]->mutable_cpu_data();
    const int dim = this->scale_dim_;
    const std::int64_t inner = this->inner_dim_;
    parallel_for(std::int64_t(this->outer_dim_) * dim, [&](std::int64_t p) {
      const float s = scale[p % dim], b = bias ? bias[p % dim] : 0.f;
      for (std::int64_t i = p * inner; i < (p + 1) * inner; ++i) {
        const float scaled = x[i] * s;
        y[i] = bias ? scaled + b : scaled;
      }
    });
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (bottom.size() > 1 || parameter_gradients())
      return caffe::ScaleLayer<float>::Backward_cpu(top, propagate_down, bottom);
    if (!propagate_down[0] || folded_backward_) return;
    const float* scale = factors();
    const float* g = top[0]->cpu_diff();
    float* out = bottom[0]->mutable_cpu_diff();
    const int dim = this->scale_dim_;
    const std::int64_t inner = this->inner_dim_;
    parallel_for(std::int64_t(this->outer_dim_) * dim, [&](std::int64_t p) {
      const float s = scale[p % dim];
      for (std::int64_t i = p * inner; i < (p + 1) * inner; ++i) out[i] = g[i] * s;
    });
  }

 private:
  bool parameter_gradients() const {
    return std::any_of(this->param_propagate_down_.begin(), this->param_propagate_down_.end(),
                       [](bool b) { return b; });
  }

  bool folded_forward_ = false, folded_backward_ = false;
};

// An element-wise pass over several arrays, a cache-sized chunk at a time over the cores: each chunk
// stays in L1 from one array to the next instead of coming from memory once per array.
template <typename F>
void in_chunks(std::int64_t count, F body) {
  constexpr std::int64_t kChunk = 4096;
  const std::int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (count >= (1 << 16))
  for (std::int64_t c = 0; c < chunks; ++c) body(c * kChunk, std::min(count, (c + 1) * kChunk));
}

// Element-wise sum with unit coefficients (ResNet's shortcut): ((0 + a) + b) + ..., and the diff
// copied to every input, as Caffe's axpy and copy give them.
class EltwiseLayer : public caffe::EltwiseLayer<float> {
 public:
  using caffe::EltwiseLayer<float>::EltwiseLayer;

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override {
    if (!plain_sum()) return caffe::EltwiseLayer<float>::Forward_cpu(bottom, top);
    std::vector<const float*> inputs;
    for (const caffe::Blob<float>* blob : bottom) inputs.push_back(blob->cpu_data());
    float* y = top[0]->mutable_cpu_data();
    in_chunks(top[0]->count(), [&](std::int64_t begin, std::int64_t end) {
      for (std::size_t b = 0; b < inputs.size(); ++b) {
        const float* x = inputs[b];
        const bool first = b == 0;
#pragma omp simd
        for (std::int64_t i = begin; i < end; ++i) y[i] = (first ? 0.f : y[i]) + x[i];
      }
    });
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!plain_sum()) return caffe::EltwiseLayer<float>::Backward_cpu(top, propagate_down, bottom);
    const float* g = top[0]->cpu_diff();
    std::vector<float*> outputs;
    for (std::size_t b = 0; b < bottom.size(); ++b)
      if (propagate_down[b]) outputs.push_back(bottom[b]->mutable_cpu_diff());
    in_chunks(top[0]->count(), [&](std::int64_t begin, std::int64_t end) {
      for (float* out : outputs) std::copy(g + begin, g + end, out + begin);
    });
  }

 private:
  bool plain_sum() const {
    return this->op_ == caffe::EltwiseParameter_EltwiseOp_SUM &&
           std::all_of(this->coeffs_.begin(), this->coeffs_.end(), [](float c) { return c == 1.f; });
  }
};

// Split's backward sums its tops' diffs, (a + b) + c ..., as Caffe's add and axpy do, over the cores.
class SplitLayer : public caffe::SplitLayer<float> {
 public:
  using caffe::SplitLayer<float>::SplitLayer;

 protected:
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!propagate_down[0] || top.size() < 2)
      return caffe::SplitLayer<float>::Backward_cpu(top, propagate_down, bottom);
    std::vector<const float*> diffs;
    for (const caffe::Blob<float>* blob : top) diffs.push_back(blob->cpu_diff());
    float* out = bottom[0]->mutable_cpu_diff();
    in_chunks(bottom[0]->count(), [&](std::int64_t begin, std::int64_t end) {
      const float *a = diffs[0], *b = diffs[1];
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
      for (std::size_t t = 2; t < diffs.size(); ++t) {
        const float* c = diffs[t];
#pragma omp simd
        for (std::int64_t i = begin; i < end; ++i) out[i] += c[i];
      }
    });
  }
};

// Fully connected layers through inner_product.hpp's streaming products: the data backward always (its
// order of summation is free: the forward's masks are fixed), the forward only when not exact.
class InnerProductLayer : public caffe::InnerProductLayer<float> {
 public:
  InnerProductLayer(const caffe::LayerParameter& param, bool forward)
      : caffe::InnerProductLayer<float>(param), streamed_forward_(forward) {}

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override {
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
                          this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr,
                          top[0]->mutable_cpu_data());
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    const bool weight_gradients =
        this->param_propagate_down_[0] || (this->bias_term_ && this->param_propagate_down_[1]);
    if (weight_gradients || this->transpose_)
      return caffe::InnerProductLayer<float>::Backward_cpu(top, propagate_down, bottom);
    if (propagate_down[0])
      inner_product_backward(this->M_, this->K_, this->N_, top[0]->cpu_diff(), this->blobs_[0]->cpu_data(),
                             bottom[0]->mutable_cpu_diff());
  }

 private:
  bool streamed_forward_;
  std::vector<float> ones_;
};

#ifdef FASTSAL_WITH_DNNL
dnnl::engine& cpu_engine() {
  static dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
  return cpu;
}

// Buffers shared by every oneDNN layer of one net (they run one at a time): the blocked copies of the
// activations and diffs, and the scratchpads. Per layer they would double the net's activation memory.
class Workspace {
 public:
  enum Slot { kInput, kOutput, kScratchpad, kColumns, kSlots };
  void* get(Slot slot, std::size_t bytes) {
    Buffer& buffer = buffers_[slot];
    if (buffer.bytes < bytes) {
      buffer.data.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      if (!buffer.data) throw std::bad_alloc();
      buffer.bytes = bytes;
    }
    return buffer.data.get();
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    std::size_t bytes = 0;
  };
  Buffer buffers_[kSlots];
};

// A tensor in the layout a oneDNN primitive chose, fed from or read back into Caffe's plain one: the
// reorders and a buffer exist only when the two layouts differ. The buffer is the workspace's slot,
// or with no workspace the layout's own, kept between calls (the weights, reordered once per forward).
class Layout {
 public:
  Layout() = default;
  Layout(const dnnl::memory::desc& plain, const dnnl::memory::desc& chosen, Workspace* workspace,
         Workspace::Slot slot)
      : plain_(plain), chosen_(chosen), workspace_(workspace), slot_(slot), copies_(chosen != plain) {
    if (!copies_) return;
    if (!workspace_) own_ = dnnl::memory(chosen, cpu_engine());
    to_chosen_ = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), plain, cpu_engine(), chosen));
    to_plain_ = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), chosen, cpu_engine(), plain));
  }
  // The primitive's argument holding Caffe's values at `data`.
  dnnl::memory in(dnnl::stream& stream, const float* data) const {
    dnnl::memory plain(plain_, cpu_engine(), const_cast<float*>(data));
    if (!copies_) return plain;
    dnnl::memory copy = buffer();
    to_chosen_.execute(stream, plain, copy);
    return copy;
  }
  // The primitive's argument for an output that belongs at `data`; then `back` puts it there.
  dnnl::memory out(float* data) const {
    return copies_ ? buffer() : dnnl::memory(plain_, cpu_engine(), data);
  }
  void back(dnnl::stream& stream, float* data) const {
    if (!copies_) return;
    dnnl::memory copy = buffer(), plain(plain_, cpu_engine(), data);
    to_plain_.execute(stream, copy, plain);
  }
  // The layout's own copy (null when the layouts agree or the workspace holds it), kept between calls.
  const dnnl::memory& kept() const { return own_; }
  // What it needs of the workspace's `slot`.
  std::size_t bytes_in(Workspace::Slot slot) const {
    return copies_ && workspace_ && slot_ == slot ? chosen_.get_size() : 0;
  }

 private:
  dnnl::memory buffer() const {
    return own_ ? own_ : dnnl::memory(chosen_, cpu_engine(), workspace_->get(slot_, chosen_.get_size()));
  }
  dnnl::memory::desc plain_, chosen_;
  Workspace* workspace_ = nullptr;
  Workspace::Slot slot_ = Workspace::kInput;
  bool copies_ = false;
  dnnl::memory own_;
  dnnl::reorder to_chosen_, to_plain_;
};

// How a convolution's data backward computes. It applies the forward's fixed masks, so its arithmetic
// changes only rounding, never which path a gradient takes. Measured per layer (docs/design.md):
// - fp32 Winograd F(4x4, 3x3): 1.3-1.8x faster than the direct kernel from 28x28 output pixels up (2x
//   slower at 14x14 with one image); maps within 4e-6 of the seed recipe on VGG-16. Chosen by the layer's
//   shape alone, never the batch's: an image's map does not depend on the images that share its batch.
// - bf16 on AMX: 2-4x faster again, but within 1e-2 of the maximum only, so the inexact mode alone uses
//   it, and not for 1x1 layers, where the reorders to and from its NHWC layout cost what it saves.
// bf16 without AMX (avx512_core_bf16) is slower than fp32, and oneDNN has Winograd on avx512_core only:
// elsewhere creating the primitive fails and the direct kernel runs.
struct BackwardArithmetic {
  dnnl::algorithm algorithm = dnnl::algorithm::convolution_direct;
  dnnl::memory::data_type type = dnnl::memory::data_type::f32;
};

bool cpu_has_amx() {
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto amx = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_amx);
  return (isa & amx) == amx;
}

BackwardArithmetic backward_arithmetic(bool bf16, const int* kernel, const int* stride, const int* dilation,
                                       int group, std::int64_t output_pixels) {
  BackwardArithmetic choice;
  static const bool amx = cpu_has_amx();
  if (bf16 && amx && kernel[0] * kernel[1] > 1) {
    choice.type = dnnl::memory::data_type::bf16;
  } else if (kernel[0] == 3 && kernel[1] == 3 && stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 &&
             dilation[1] == 1 && group == 1 && output_pixels >= 28 * 28) {
    choice.algorithm = dnnl::algorithm::convolution_winograd;
  }
  return choice;
}

// Convolution through oneDNN, in the blocked layouts its fastest kernels want (reordered from and to
// Caffe's NCHW around each call). The data-only backward always: it applies the forward's fixed
// masks, so another summation order changes only rounding. The forward only on request (not exact):
// a forward computed in another order rounds differently, and at ReLU's kink and max pooling's
// near-ties that rounding reroutes whole gradients.
class DnnlConvolutionLayer : public caffe::ConvolutionLayer<float> {
 public:
  DnnlConvolutionLayer(const caffe::LayerParameter& param, bool forward, bool bf16_backward,
                       std::shared_ptr<Workspace> workspace)
      : caffe::ConvolutionLayer<float>(param),
        dnnl_forward_(forward),
        bf16_backward_(bf16_backward),
        workspace_(std::move(workspace)) {}

  static bool supports(const caffe::LayerParameter& param, const caffe::Blob<float>& bottom) {
    const auto& p = param.convolution_param();
    return bottom.num_axes() == 4 && p.axis() == 1 && !p.force_nd_im2col();
  }

  // A test-time BatchNorm and a Scale in place on this layer's output are per-channel affine maps: folded
  // into the weights (W * gamma / deviation per output channel), they cost nothing. In the backward the
  // folded weights change only rounding; in the forward they do not round as Caffe does (inexact only).
  bool can_fold() const { return usable_ && !weight_gradients(); }
  bool dnnl_forward() const { return dnnl_forward_; }
  // The layout the oneDNN forward, as built, reads its input (bottom) or writes its output in, where it
  // is one of oneDNN's channel-blocked ones or NHWC (tag::undef otherwise): a blob that holds it spares
  // the reorder.
  dnnl::memory::format_tag chosen_layout(bool bottom) const {
    using tag = dnnl::memory::format_tag;
    if (!usable_ || !dnnl_forward_ || weight_gradients()) return tag::undef;
    const dnnl::memory::desc chosen = bottom ? forward_pd_.src_desc() : forward_pd_.dst_desc();
    for (const tag layout : {tag::aBcd16b, tag::aBcd8b, tag::aBcd4b, tag::acdb})
      if (chosen == dnnl::memory::desc(chosen.dims(), dnnl::memory::data_type::f32, layout)) return layout;
    return tag::undef;
  }
  // The layouts the bottom's and the top's blobs hold, data and diff; undef: Caffe's NCHW.
  void hold_layouts(dnnl::memory::format_tag bottom, dnnl::memory::format_tag top) {
    if (bottom == bottom_layout_ && top == top_layout_) return;
    bottom_layout_ = bottom, top_layout_ = top;
    primed_shape_.clear();  // the next Reshape rebuilds the reorders for these layouts
  }
  // What its blocked copies, as built for the current batch, need of the shared workspace's `slot`.
  std::size_t workspace_bytes(Workspace::Slot slot) const {
    if (!usable_) return 0;
    return std::max({forward_src_.bytes_in(slot), forward_dst_.bytes_in(slot),
                     backward_diff_dst_.bytes_in(slot), backward_diff_src_.bytes_in(slot)});
  }
  void fold(const BatchNormLayer* norm, const ScaleLayer* scale, bool forward, bool backward) {
    if (forward != fold_forward_) primed_shape_.clear();  // the forward primitive then needs a bias
    norm_ = norm, scale_ = scale, fold_forward_ = forward, fold_backward_ = backward;
    weights_current_ = false;
  }

  void Reshape(const std::vector<caffe::Blob<float>*>& bottom,
               const std::vector<caffe::Blob<float>*>& top) override {
    caffe::ConvolutionLayer<float>::Reshape(bottom, top);
    if (bottom[0]->shape() == primed_shape_) return;
    primed_shape_ = bottom[0]->shape();
    build_primitives(*bottom[0], *top[0]);
  }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override {
    weights_current_ = false;  // the user may have changed the weights since the last pass
    if (!usable_ || !dnnl_forward_) return exact_forward(bottom, top);
    dnnl::stream stream(cpu_engine());
    const dnnl::memory weights = weights_in(stream, forward_weights_, fold_forward_);
    for (std::size_t i = 0; i < bottom.size(); ++i) {
      std::unordered_map<int, dnnl::memory> args = {
          {DNNL_ARG_SRC, forward_src_.in(stream, bottom[i]->cpu_data())},
          {DNNL_ARG_WEIGHTS, weights},
          {DNNL_ARG_DST, forward_dst_.out(top[i]->mutable_cpu_data())},
          {DNNL_ARG_SCRATCHPAD, scratchpad(forward_pd_.scratchpad_desc())}};
      if (fold_forward_)
        args[DNNL_ARG_BIAS] = dnnl::memory(forward_pd_.bias_desc(), cpu_engine(), folded_bias_.data());
      else if (this->bias_term_)
        args[DNNL_ARG_BIAS] = dnnl::memory(forward_pd_.bias_desc(), cpu_engine(),
                                           const_cast<float*>(this->blobs_[1]->cpu_data()));
      forward_.execute(stream, args);
      forward_dst_.back(stream, top[i]->mutable_cpu_data());
    }
    stream.wait();
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!usable_ || weight_gradients())
      return caffe::ConvolutionLayer<float>::Backward_cpu(top, propagate_down, bottom);
    dnnl::stream stream(cpu_engine());
    const dnnl::memory weights = weights_in(stream, backward_weights_, fold_backward_);
    for (std::size_t i = 0; i < top.size(); ++i) {
      if (!propagate_down[i]) continue;
      backward_.execute(stream, {{DNNL_ARG_DIFF_DST, backward_diff_dst_.in(stream, top[i]->cpu_diff())},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_SRC, backward_diff_src_.out(bottom[i]->mutable_cpu_diff())},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad(backward_pd_.scratchpad_desc())}});
      backward_diff_src_.back(stream, bottom[i]->mutable_cpu_diff());
    }
    stream.wait();
  }

 private:
  bool weight_gradients() const {
    return this->param_propagate_down_[0] || (this->bias_term_ && this->param_propagate_down_[1]);
  }

  // The weights as `layout` wants them, folded or not. Blocked copies are refreshed once per forward
  // pass (the user may change the weights between calls); the K backward passes that follow reuse them.
  dnnl::memory weights_in(dnnl::stream& stream, const Layout& layout, bool folded) {
    if (!weights_current_) {
      if (fold_forward_ || fold_backward_) fold_weights();
      if (forward_weights_.kept()) forward_weights_.in(stream, weights(fold_forward_));
      if (backward_weights_.kept()) backward_weights_.in(stream, weights(fold_backward_));
      weights_current_ = true;
    }
    return layout.kept() ? layout.kept() : layout.in(stream, weights(folded));
  }
  const float* weights(bool folded) const {
    return folded ? folded_weights_.data() : this->blobs_[0]->cpu_data();
  }

  // W * f and (b - mean) * f + beta per output channel, f = gamma / deviation.
  void fold_weights() {
    std::vector<float> mean, deviation;
    norm_->statistics(&mean, &deviation);
    const float* gamma = scale_->factors();
    const float* beta = scale_->bias();
    const float* w = this->blobs_[0]->cpu_data();
    const float* b = this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr;
    const int outputs = this->num_output_;
    const std::int64_t per_output = this->blobs_[0]->count() / outputs;
    folded_weights_.resize(this->blobs_[0]->count());
    folded_bias_.resize(outputs);
    parallel_for(outputs, [&](std::int64_t o) {
      const float f = gamma[o] / deviation[o];
      for (std::int64_t j = o * per_output; j < (o + 1) * per_output; ++j) folded_weights_[j] = w[j] * f;
      folded_bias_[o] = ((b ? b[o] : 0.f) - mean[o]) * f + (beta ? beta[o] : 0.f);
    });
  }

  void build_primitives(const caffe::Blob<float>& bottom, const caffe::Blob<float>& top) {
    using tag = dnnl::memory::format_tag;
    using dims = dnnl::memory::dims;
    using desc = dnnl::memory::desc;
    const auto f32 = dnnl::memory::data_type::f32;
    const int* kernel = this->kernel_shape_.cpu_data();
    const int* stride = this->stride_.cpu_data();
    const int* pad = this->pad_.cpu_data();
    const int* dilation = this->dilation_.cpu_data();
    const dnnl::memory::dim g = this->group_;
    const dims src_dims = {bottom.shape(0), bottom.shape(1), bottom.shape(2), bottom.shape(3)};
    const dims dst_dims = {top.shape(0), top.shape(1), top.shape(2), top.shape(3)};
    // Caffe floors the output size; oneDNN wants the right padding that implies. Where Caffe's last window
    // ends short of the input's edge (a 1x1 stride-2 layer on an even size: ResNet's downsampling), that is
    // none: oneDNN floors too. Whatever oneDNN could not size as Caffe does runs Caffe's own code.
    dims padding_r(2);
    usable_ = true;
    for (int a = 0; a < 2; ++a) {
      const dnnl::memory::dim extent = (kernel[a] - 1) * dilation[a] + 1;
      padding_r[a] = std::max<dnnl::memory::dim>(
          0, (dst_dims[2 + a] - 1) * stride[a] + extent - src_dims[2 + a] - pad[a]);
      usable_ =
          usable_ && (src_dims[2 + a] + pad[a] + padding_r[a] - extent) / stride[a] + 1 == dst_dims[2 + a];
    }
    if (!usable_) return;
    const dims weight_dims = g == 1 ? dims{dst_dims[1], src_dims[1], kernel[0], kernel[1]}
                                    : dims{g, dst_dims[1] / g, src_dims[1] / g, kernel[0], kernel[1]};
    // The blobs' own layouts: Caffe's NCHW, or oneDNN's where keep_blocked_layouts chose it.
    const desc src(src_dims, f32, bottom_layout_ == tag::undef ? tag::nchw : bottom_layout_),
        dst(dst_dims, f32, top_layout_ == tag::undef ? tag::nchw : top_layout_),
        weights(weight_dims, f32, g == 1 ? tag::oihw : tag::goihw);
    const desc src_any(src_dims, f32, tag::any), dst_any(dst_dims, f32, tag::any),
        weights_any(weight_dims, f32, tag::any), bias(dims{dst_dims[1]}, f32, tag::x);
    const dims strides = {stride[0], stride[1]}, dilates = {dilation[0] - 1, dilation[1] - 1},
               padding_l = {pad[0], pad[1]};
    // The forward direct and fp32, never Winograd or bf16: their rounding reroutes gradients at ReLU's kink
    // (Spearman 0.91 and 0.57 with the exact maps on VGG-16). The scratchpads are the layer's own: oneDNN's
    // shared one would tie the primitives to the thread that created them.
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const auto forward_desc =
        this->bias_term_ || fold_forward_
            ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                              dnnl::algorithm::convolution_direct, src_any, weights_any, bias,
                                              dst_any, strides, dilates, padding_l, padding_r)
            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                              dnnl::algorithm::convolution_direct, src_any, weights_any,
                                              dst_any, strides, dilates, padding_l, padding_r);
    forward_pd_ = dnnl::convolution_forward::primitive_desc(forward_desc, attr, cpu_engine());
    backward_pd_ =
        backward_primitive(backward_arithmetic(bf16_backward_, kernel, stride, dilation, this->group_,
                                               dst_dims[2] * dst_dims[3]),
                           src_dims, weight_dims, dst_dims, strides, dilates, padding_l, padding_r, attr);
    backward_ = dnnl::convolution_backward_data(backward_pd_);
    backward_diff_dst_ = Layout(dst, backward_pd_.diff_dst_desc(), workspace_.get(), Workspace::kInput);
    backward_diff_src_ = Layout(src, backward_pd_.diff_src_desc(), workspace_.get(), Workspace::kOutput);
    backward_weights_ = Layout(weights, backward_pd_.weights_desc(), nullptr, Workspace::kInput);
    if (dnnl_forward_) {
      forward_ = dnnl::convolution_forward(forward_pd_);
      forward_src_ = Layout(src, forward_pd_.src_desc(), workspace_.get(), Workspace::kInput);
      forward_dst_ = Layout(dst, forward_pd_.dst_desc(), workspace_.get(), Workspace::kOutput);
      forward_weights_ = Layout(weights, forward_pd_.weights_desc(), nullptr, Workspace::kInput);
    }
    weights_current_ = false;
  }

  // The data backward as `arithmetic` says, or the direct fp32 kernel where oneDNN has no such primitive.
  // The diff it writes is fp32 either way; a bf16 primitive reads bf16 copies of the diff and weights.
  dnnl::convolution_backward_data::primitive_desc backward_primitive(
      const BackwardArithmetic& arithmetic, const dnnl::memory::dims& src_dims,
      const dnnl::memory::dims& weight_dims, const dnnl::memory::dims& dst_dims,
      const dnnl::memory::dims& strides, const dnnl::memory::dims& dilates,
      const dnnl::memory::dims& padding_l, const dnnl::memory::dims& padding_r,
      const dnnl::primitive_attr& attr) const {
    using desc = dnnl::memory::desc;
    const auto any = dnnl::memory::format_tag::any;
    const auto f32 = dnnl::memory::data_type::f32, type = arithmetic.type;
    const desc diff_src(src_dims, f32, any), weights(weight_dims, type, any), diff_dst(dst_dims, type, any);
    try {
      // The forward primitive only hints the layouts; the bf16 one is never run.
      const auto hint =
          type == f32
              ? forward_pd_
              : dnnl::convolution_forward::primitive_desc(
                    dnnl::convolution_forward::desc(
                        dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                        desc(src_dims, type, any), weights, diff_dst, strides, dilates, padding_l, padding_r),
                    attr, cpu_engine());
      return dnnl::convolution_backward_data::primitive_desc(
          dnnl::convolution_backward_data::desc(arithmetic.algorithm, diff_src, weights, diff_dst, strides,
                                                dilates, padding_l, padding_r),
          attr, cpu_engine(), hint);
    } catch (const dnnl::error&) {
      if (arithmetic.algorithm == dnnl::algorithm::convolution_direct && type == f32) throw;
      return backward_primitive(BackwardArithmetic(), src_dims, weight_dims, dst_dims, strides, dilates,
                                padding_l, padding_r, attr);
    }
  }

  // Caffe's forward, GEMM for GEMM (gemm.hpp: on fastsal's threads, bit for bit Caffe's), with its
  // single-threaded im2col (VGG-16 writes 330 MB of columns per image) spread over the cores.
  void exact_forward(const std::vector<caffe::Blob<float>*>& bottom,
                     const std::vector<caffe::Blob<float>*>& top) {
    if (this->num_spatial_axes_ != 2 || this->force_nd_im2col_)
      return caffe::ConvolutionLayer<float>::Forward_cpu(bottom, top);
    const int channels = this->channels_, height = this->conv_input_shape_.cpu_data()[1],
              width = this->conv_input_shape_.cpu_data()[2];
    const int* kernel = this->kernel_shape_.cpu_data();
    const int* stride = this->stride_.cpu_data();
    const int* pad = this->pad_.cpu_data();
    const int* dilation = this->dilation_.cpu_data();
    const int out_h = this->output_shape_[0], out_w = this->output_shape_[1];
    const std::int64_t per_channel = std::int64_t(kernel[0]) * kernel[1] * out_h * out_w;
    // BaseConvolutionLayer's private sizes, as it derives them.
    const int group = this->group_, spatial = this->out_spatial_dim_, rows = this->num_output_ / group,
              depth = int(channels / group * kernel[0] * kernel[1]);
    const std::int64_t column_group = std::int64_t(depth) * spatial,
                       output_group = std::int64_t(rows) * spatial;
    if (int(ones_.size()) != spatial) ones_.assign(spatial, 1.f);  // Caffe's bias_multiplier_
    float* columns = this->is_1x1_
                         ? nullptr
                         : static_cast<float*>(workspace_->get(
                               Workspace::kColumns, std::size_t(channels) * per_channel * sizeof(float)));
    const float* weight = this->blobs_[0]->cpu_data();
    for (std::size_t i = 0; i < bottom.size(); ++i) {
      for (int n = 0; n < this->num_; ++n) {
        const float* image = bottom[i]->cpu_data() + std::int64_t(n) * this->bottom_dim_;
        if (!this->is_1x1_) {
#pragma omp parallel for schedule(static) if (channels * per_channel >= (1 << 16))
          for (int c = 0; c < channels; ++c) {  // caffe::im2col_cpu's values, a channel per task
            const float* plane = image + std::int64_t(c) * height * width;
            float* out = columns + c * per_channel;
            for (int kr = 0; kr < kernel[0]; ++kr)
              for (int kc = 0; kc < kernel[1]; ++kc)
                for (int oh = 0; oh < out_h; ++oh) {
                  const int row = -pad[0] + kr * dilation[0] + oh * stride[0];
                  for (int ow = 0; ow < out_w; ++ow) {
                    const int col = -pad[1] + kc * dilation[1] + ow * stride[1];
                    *out++ = (row >= 0 && row < height && col >= 0 && col < width) ? plane[row * width + col]
                                                                                   : 0.f;
                  }
                }
          }
        }
        const float* input = this->is_1x1_ ? image : columns;
        float* output = top[i]->mutable_cpu_data() + std::int64_t(n) * this->top_dim_;
        for (int g = 0; g < group; ++g)  // BaseConvolutionLayer::forward_cpu_gemm's products
          gemm(false, false, rows, spatial, depth, 1.f, weight + std::int64_t(this->weight_offset_) * g,
               input + column_group * g, 0.f, output + output_group * g);
        if (this->bias_term_)  // and forward_cpu_bias's
          gemm(false, false, this->num_output_, spatial, 1, 1.f, this->blobs_[1]->cpu_data(), ones_.data(),
               1.f, output);
      }
    }
  }

  dnnl::memory scratchpad(const dnnl::memory::desc& desc) {
    return dnnl::memory(desc, cpu_engine(), workspace_->get(Workspace::kScratchpad, desc.get_size()));
  }

  bool dnnl_forward_, bf16_backward_;
  std::shared_ptr<Workspace> workspace_;
  std::vector<float> ones_;
  std::vector<int> primed_shape_;
  bool usable_ = false;
  bool weights_current_ = false;
  const BatchNormLayer* norm_ = nullptr;
  const ScaleLayer* scale_ = nullptr;
  bool fold_forward_ = false, fold_backward_ = false;
  dnnl::memory::format_tag bottom_layout_ = dnnl::memory::format_tag::undef,
                           top_layout_ = dnnl::memory::format_tag::undef;
  std::vector<float> folded_weights_, folded_bias_;
  dnnl::convolution_forward::primitive_desc forward_pd_;
  dnnl::convolution_forward forward_;
  Layout forward_src_, forward_dst_, forward_weights_;
  dnnl::convolution_backward_data::primitive_desc backward_pd_;
  dnnl::convolution_backward_data backward_;
  Layout backward_diff_dst_, backward_diff_src_, backward_weights_;
};
#endif  // FASTSAL_WITH_DNNL

}  // namespace

std::string onednn_isa() {
#ifdef FASTSAL_WITH_DNNL
  using isa = dnnl::cpu_isa;
  const std::pair<isa, const char*> names[] = {{isa::avx512_core_amx, "avx512_core_amx"},
                                               {isa::avx512_core_bf16, "avx512_core_bf16"},
                                               {isa::avx512_core_vnni, "avx512_core_vnni"},
                                               {isa::avx512_core, "avx512_core"},
                                               {isa::avx2_vnni, "avx2_vnni"},
                                               {isa::avx2, "avx2"},
                                               {isa::avx, "avx"},
                                               {isa::sse41, "sse41"}};
  const auto effective = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  for (const auto& [value, name] : names)  // each ISA's mask includes those below it
    if ((effective & static_cast<unsigned>(value)) == static_cast<unsigned>(value)) return name;
  return "unknown";
#else
  return "";
#endif
}

bool inexact_backward_in_bf16() {
#ifdef FASTSAL_WITH_DNNL
  return cpu_has_amx();
#else
  return false;
#endif
}

SaliencyNet::SaliencyNet(const caffe::NetParameter& param, const LayerSwaps& swaps)
    : caffe::Net<float>(param) {
  // Each replacement gets the same parameter and the old layer's blobs (so nothing is re-initialised,
  // and weights shared later are shared with it), then is set up on the same bottoms and tops.
#ifdef FASTSAL_WITH_DNNL
  const auto workspace = std::make_shared<Workspace>();
#endif
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const std::string type = layers_[i]->type();
    const caffe::LayerParameter& p = layers_[i]->layer_param();
    boost::shared_ptr<caffe::Layer<float>> layer;
    const bool plain_relu = type == "ReLU" && p.relu_param().negative_slope() == 0.f;
    if (type == "Pooling") {
      layer.reset(new PoolingLayer(p));
    } else if (plain_relu && swaps.relu_rule != ReLURule::kGradient) {
      layer.reset(new RuleReLULayer(p, swaps.relu_rule == ReLURule::kGuided));
    } else if (swaps.fast && type == "ReLU") {
      layer.reset(new ReLULayer(p));
    } else if (swaps.fast && type == "BatchNorm") {
      layer.reset(new BatchNormLayer(p));
    } else if (swaps.fast && type == "Scale") {
      layer.reset(new ScaleLayer(p));
    } else if (swaps.fast && type == "Eltwise") {
      layer.reset(new EltwiseLayer(p));
    } else if (swaps.fast && type == "Split") {
      layer.reset(new SplitLayer(p));
    } else if (swaps.fast && type == "InnerProduct") {
      layer.reset(new InnerProductLayer(p, swaps.fast_forward));
#ifdef FASTSAL_WITH_DNNL
    } else if (swaps.fast && type == "Convolution" &&
               DnnlConvolutionLayer::supports(p, *bottom_vecs_[i][0])) {
      layer.reset(new DnnlConvolutionLayer(p, swaps.fast_forward, swaps.bf16_backward, workspace));
#endif
    } else {
      continue;
    }
    layer->blobs() = layers_[i]->blobs();
    layer->SetUp(bottom_vecs_[i], top_vecs_[i]);
    layers_[i] = layer;
  }
}

void SaliencyNet::fold_batch_norm(int first, int last) {
#ifdef FASTSAL_WITH_DNNL
  for (std::size_t i = 0; i + 2 < layers_.size(); ++i) {
    auto* conv = dynamic_cast<DnnlConvolutionLayer*>(layers_[i].get());
    auto* norm = dynamic_cast<BatchNormLayer*>(layers_[i + 1].get());
    auto* scale = dynamic_cast<ScaleLayer*>(layers_[i + 2].get());
    if (!conv || !norm || !scale || top_vecs_[i].size() != 1) continue;
    caffe::Blob<float>* blob = top_vecs_[i][0];
    bool in_place = true;  // one blob through all three: nothing else sees the values in between
    for (std::size_t l = i + 1; l <= i + 2; ++l)
      in_place = in_place && bottom_vecs_[l].size() == 1 && top_vecs_[l].size() == 1 &&
                 bottom_vecs_[l][0] == blob && top_vecs_[l][0] == blob;
    if (!in_place || !norm->global_statistics() || !scale->per_channel(blob->shape(1)) || !conv->can_fold())
      continue;
    const int at = static_cast<int>(i);
    const bool forward = conv->dnnl_forward() && at + 2 <= last;
    const bool backward = first <= at && at + 2 <= last;
    conv->fold(norm, scale, forward, backward);
    const bool idle = backward || at + 2 < first;  // below `first` no backward runs: nothing left to do
    norm->fold(forward, idle);
    scale->fold(forward, idle);
  }
#else
  (void)first, (void)last;
#endif
}

#ifdef FASTSAL_WITH_DNNL
namespace {

// Layers that treat every element alike (the folded BatchNorm and Scale do nothing): any layout their
// blobs share gives the same values.
bool element_wise(const caffe::Layer<float>& layer) {
  if (const auto* norm = dynamic_cast<const BatchNormLayer*>(&layer)) return norm->folded();
  if (const auto* scale = dynamic_cast<const ScaleLayer*>(&layer)) return scale->folded();
  return dynamic_cast<const ReLULayer*>(&layer) || dynamic_cast<const RuleReLULayer*>(&layer) ||
         dynamic_cast<const EltwiseLayer*>(&layer) || dynamic_cast<const SplitLayer*>(&layer);
}

}  // namespace
#endif

void SaliencyNet::keep_blocked_layouts(const std::vector<const caffe::Blob<float>*>& plain) {
#ifdef FASTSAL_WITH_DNNL
  using tag = dnnl::memory::format_tag;
  // Blobs joined by an element-wise layer share one layout (and one shape): groups, by union-find.
  std::vector<int> parent(blobs_.size());
  std::iota(parent.begin(), parent.end(), 0);
  const auto root = [&parent](int b) {
    while (parent[b] != b) b = parent[b] = parent[parent[b]];
    return b;
  };
  // Per blob, the layout its convolutions want; tag::any: none asked yet; tag::undef: Caffe's NCHW.
  // Two wishes agree or the answer is NCHW.
  const auto merge = [](tag& into, tag layout) {
    into = into == tag::any || into == layout ? layout : tag::undef;
  };
  std::vector<tag> wanted(blobs_.size(), tag::any);
  for (std::size_t b = 0; b < blobs_.size(); ++b)
    if (blobs_[b]->num_axes() != 4 || std::find(plain.begin(), plain.end(), blobs_[b].get()) != plain.end())
      wanted[b] = tag::undef;
  for (const int b : net_input_blob_indices_) wanted[b] = tag::undef;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const std::vector<int>& bottoms = bottom_id_vecs_[l];
    const std::vector<int>& tops = top_id_vecs_[l];
    if (const auto* conv = dynamic_cast<const DnnlConvolutionLayer*>(layers_[l].get())) {
      const bool single = bottoms.size() == 1 && tops.size() == 1;  // one reorder serves every pair
      for (const int b : bottoms) merge(wanted[b], single ? conv->chosen_layout(true) : tag::undef);
      for (const int t : tops) merge(wanted[t], single ? conv->chosen_layout(false) : tag::undef);
    } else if (element_wise(*layers_[l])) {
      const int first = bottoms.empty() ? tops.front() : bottoms.front();
      for (const auto* ids : {&bottoms, &tops})
        for (const int b : *ids) parent[root(b)] = root(first);
    } else {  // Caffe's own code, pooling, products, the input...: they index NCHW
      for (const auto* ids : {&bottoms, &tops})
        for (const int b : *ids) wanted[b] = tag::undef;
    }
  }
  std::vector<tag> layout(blobs_.size(), tag::any);  // per group root: what all its members want
  for (std::size_t b = 0; b < blobs_.size(); ++b)
    if (wanted[b] != tag::any) merge(layout[root(int(b))], wanted[b]);
  // A layout that pads (nChw16c on 24 channels) does not fit in the blob.
  for (std::size_t b = 0; b < blobs_.size(); ++b) {
    tag& group = layout[root(int(b))];
    const caffe::Blob<float>& blob = *blobs_[b];
    if (group != tag::any && group != tag::undef &&
        dnnl::memory::desc({blob.shape(0), blob.shape(1), blob.shape(2), blob.shape(3)},
                           dnnl::memory::data_type::f32, group)
                .get_size() != blob.count() * sizeof(float))
      group = tag::undef;
  }
  const auto layout_of = [&](int b) { return layout[root(b)] == tag::any ? tag::undef : layout[root(b)]; };
  for (std::size_t l = 0; l < layers_.size(); ++l)
    if (auto* conv = dynamic_cast<DnnlConvolutionLayer*>(layers_[l].get()))
      if (bottom_id_vecs_[l].size() == 1 && top_id_vecs_[l].size() == 1)
        conv->hold_layouts(layout_of(bottom_id_vecs_[l][0]), layout_of(top_id_vecs_[l][0]));
  blocked_blobs_.clear();
  for (std::size_t b = 0; b < blobs_.size(); ++b)
    if (layout_of(int(b)) != tag::undef) blocked_blobs_.push_back(blob_names_[b]);
  Reshape();  // the convolutions rebuild their reorders now, so the workspace's size is known
#else
  (void)plain;
#endif
}

int SaliencyNet::first_overflowed_row(int last, std::string* layer) const {
  int first = -1;
  for (int l = 0; l <= last; ++l) {
    const auto* pooling = dynamic_cast<const PoolingLayer*>(layers_[l].get());
    if (!pooling || pooling->overflowed_row() < 0) continue;
    if (first < 0 || pooling->overflowed_row() < first) {
      first = pooling->overflowed_row();
      *layer = "layer '" + layer_names_[l] + "' (Pooling)";
    }
  }
  return first;
}

std::size_t SaliencyNet::workspace_bytes_per_image() const {
  std::size_t bytes = 0;
#ifdef FASTSAL_WITH_DNNL
  // Not the scratchpads: measured on a Winograd layer, ~80% of its scratchpad does not grow with the batch.
  for (const auto slot : {Workspace::kInput, Workspace::kOutput}) {
    std::size_t largest = 0;  // the slot is shared: it grows to the largest layer's need
    for (const auto& layer : layers_)
      if (const auto* conv = dynamic_cast<const DnnlConvolutionLayer*>(layer.get()))
        largest = std::max(largest, conv->workspace_bytes(slot));
    bytes += largest;
  }
#endif
  return bytes;
}

}  // namespace fastsal
