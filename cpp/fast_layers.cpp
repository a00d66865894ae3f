#include "fast_layers.hpp"

#include <algorithm>
#include <caffe/layers/conv_layer.hpp>
#include <caffe/layers/pooling_layer.hpp>
#include <caffe/layers/relu_layer.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#ifdef FASTSAL_WITH_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif
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
    for (std::int64_t i = 0; i < count; ++i) out[i] = (g[i] > 0.f && (!guided_ || x[i] > 0.f)) ? g[i] : 0.f;
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
    caffe::PoolingLayer<float>::Forward_cpu(bottom, top);
    overflowed_row_ = -1;
    if (!is_max()) return;
    const std::int64_t per_row = top[0]->count(1);
    for (int n = 0; n < top[0]->shape(0) && overflowed_row_ < 0; ++n)
      for (std::int64_t i = 0; i < per_row; ++i)
        if (mask_at(top, n * per_row + i) < 0) {
          overflowed_row_ = n;
          break;
        }
  }

  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    if (!is_max()) return caffe::PoolingLayer<float>::Backward_cpu(top, propagate_down, bottom);
    if (!propagate_down[0]) return;
    const float* top_diff = top[0]->cpu_diff();
    float* bottom_diff = bottom[0]->mutable_cpu_diff();
    const std::int64_t planes = std::int64_t(top[0]->shape(0)) * this->channels_;
    const std::int64_t top_plane = std::int64_t(this->pooled_height_) * this->pooled_width_;
    const std::int64_t bottom_plane = std::int64_t(this->height_) * this->width_;
#pragma omp parallel for schedule(static) if (planes * bottom_plane >= (1 << 16))
    for (std::int64_t p = 0; p < planes; ++p) {
      float* diff = bottom_diff + p * bottom_plane;
      std::fill_n(diff, bottom_plane, 0.f);
      for (std::int64_t i = p * top_plane; i < (p + 1) * top_plane; ++i) {
        const int index = mask_at(top, i);
        if (index >= 0) diff[index] += top_diff[i];
      }
    }
  }

 private:
  bool is_max() const {
    return this->layer_param_.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_MAX;
  }
  // The argmax within its plane, from Caffe's int mask or, when the layer has a second top, from there.
  int mask_at(const std::vector<caffe::Blob<float>*>& top, std::int64_t i) const {
    return top.size() > 1 ? static_cast<int>(top[1]->cpu_data()[i]) : this->max_idx_.cpu_data()[i];
  }
  int overflowed_row_ = -1;
};

#ifdef FASTSAL_WITH_DNNL
// Caffe's data-only convolution backward is a GEMM per image plus col2im, single-threaded outside the
// GEMM; oneDNN's backward-data convolution is faster. Only the backward pass: a forward computed in
// another order rounds differently, and at ReLU's kink and max pooling's near-ties that rounding
// reroutes whole gradients, so the forward stays Caffe's, bit for bit. Plain NCHW/OIHW layouts, so
// Caffe's blobs and the user's shared weights are used in place.
class DnnlConvolutionLayer : public caffe::ConvolutionLayer<float> {
 public:
  using caffe::ConvolutionLayer<float>::ConvolutionLayer;

  static bool supports(const caffe::LayerParameter& param, const caffe::Blob<float>& bottom) {
    const auto& p = param.convolution_param();
    return bottom.num_axes() == 4 && p.axis() == 1 && !p.force_nd_im2col();
  }

  void Reshape(const std::vector<caffe::Blob<float>*>& bottom,
               const std::vector<caffe::Blob<float>*>& top) override {
    caffe::ConvolutionLayer<float>::Reshape(bottom, top);
    if (bottom[0]->shape() == primed_shape_) return;
    primed_shape_ = bottom[0]->shape();
    build_primitive(*bottom[0], *top[0]);
  }

 protected:
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    const bool weight_gradients =
        this->param_propagate_down_[0] || (this->bias_term_ && this->param_propagate_down_[1]);
    if (!usable_ || weight_gradients)
      return caffe::ConvolutionLayer<float>::Backward_cpu(top, propagate_down, bottom);
    dnnl::stream stream(engine());
    for (std::size_t i = 0; i < top.size(); ++i) {
      if (!propagate_down[i]) continue;
      dnnl::memory diff_dst(backward_pd_.diff_dst_desc(), engine(), const_cast<float*>(top[i]->cpu_diff()));
      dnnl::memory weights(backward_pd_.weights_desc(), engine(),
                           const_cast<float*>(this->blobs_[0]->cpu_data()));
      dnnl::memory diff_src(backward_pd_.diff_src_desc(), engine(), bottom[i]->mutable_cpu_diff());
      backward_.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_SRC, diff_src},
                                 {DNNL_ARG_SCRATCHPAD, scratchpad_}});
    }
    stream.wait();
  }

 private:
  static dnnl::engine& engine() {
    static dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
    return cpu;
  }

  void build_primitive(const caffe::Blob<float>& bottom, const caffe::Blob<float>& top) {
    using tag = dnnl::memory::format_tag;
    using dims = dnnl::memory::dims;
    const auto f32 = dnnl::memory::data_type::f32;
    const int* kernel = this->kernel_shape_.cpu_data();
    const int* stride = this->stride_.cpu_data();
    const int* pad = this->pad_.cpu_data();
    const int* dilation = this->dilation_.cpu_data();
    const dnnl::memory::dim g = this->group_;
    const dims src_dims = {bottom.shape(0), bottom.shape(1), bottom.shape(2), bottom.shape(3)};
    const dims dst_dims = {top.shape(0), top.shape(1), top.shape(2), top.shape(3)};
    dims padding_r(2);
    for (int a = 0; a < 2; ++a)  // Caffe floors the output size; oneDNN wants the right padding that implies
      padding_r[a] =
          (dst_dims[2 + a] - 1) * stride[a] + (kernel[a] - 1) * dilation[a] + 1 - src_dims[2 + a] - pad[a];
    usable_ = padding_r[0] >= 0 && padding_r[1] >= 0;  // else Caffe's own backward
    if (!usable_) return;
    const dnnl::memory::desc src(src_dims, f32, tag::nchw), dst(dst_dims, f32, tag::nchw);
    const dnnl::memory::desc weights =
        g == 1 ? dnnl::memory::desc({dst_dims[1], src_dims[1], kernel[0], kernel[1]}, f32, tag::oihw)
               : dnnl::memory::desc({g, dst_dims[1] / g, src_dims[1] / g, kernel[0], kernel[1]}, f32,
                                    tag::goihw);
    const dims strides = {stride[0], stride[1]}, dilates = {dilation[0] - 1, dilation[1] - 1},
               padding_l = {pad[0], pad[1]};
    // Direct, never Winograd. The scratchpad is the layer's own: oneDNN's shared one would tie the
    // primitive to the thread that created it.
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    const dnnl::convolution_forward::primitive_desc forward_hint(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                        dnnl::algorithm::convolution_direct, src, weights, dst, strides,
                                        dilates, padding_l, padding_r),
        engine());
    backward_pd_ = dnnl::convolution_backward_data::primitive_desc(
        dnnl::convolution_backward_data::desc(dnnl::algorithm::convolution_direct, src, weights, dst, strides,
                                              dilates, padding_l, padding_r),
        attr, engine(), forward_hint);
    backward_ = dnnl::convolution_backward_data(backward_pd_);
    scratchpad_ = dnnl::memory(backward_pd_.scratchpad_desc(), engine());
  }

  std::vector<int> primed_shape_;
  bool usable_ = false;
  dnnl::convolution_backward_data::primitive_desc backward_pd_;
  dnnl::convolution_backward_data backward_;
  dnnl::memory scratchpad_;
};
#endif  // FASTSAL_WITH_DNNL

}  // namespace

SaliencyNet::SaliencyNet(const caffe::NetParameter& param, const LayerSwaps& swaps)
    : caffe::Net<float>(param) {
  // Each replacement gets the same parameter and the old layer's blobs (so nothing is re-initialised,
  // and weights shared later are shared with it), then is set up on the same bottoms and tops.
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
#ifdef FASTSAL_WITH_DNNL
    } else if (swaps.fast && type == "Convolution" &&
               DnnlConvolutionLayer::supports(p, *bottom_vecs_[i][0])) {
      layer.reset(new DnnlConvolutionLayer(p));
#endif
    } else {
      continue;
    }
    layer->blobs() = layers_[i]->blobs();
    layer->SetUp(bottom_vecs_[i], top_vecs_[i]);
    layers_[i] = layer;
  }
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

}  // namespace fastsal
