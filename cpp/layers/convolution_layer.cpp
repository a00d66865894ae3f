#include "layers/convolution_layer.hpp"

#include <caffe/util/im2col.hpp>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <unordered_map>
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

void im2col_on_cores(const float* image, int channels, int height, int width, const int* kernel,
                     const int* pad, const int* stride, const int* dilation, int out_h, int out_w,
                     float* columns) {
  const std::int64_t per_channel = std::int64_t(kernel[0]) * kernel[1] * out_h * out_w;
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
            *out++ = (row >= 0 && row < height && col >= 0 && col < width) ? plane[row * width + col] : 0.f;
          }
        }
  }
}

#ifdef FASTSAL_WITH_DNNL
namespace {

struct Geometry {
  dnnl::memory::dim channels, height, width, outputs, out_h, out_w;
  dnnl::memory::dims kernel, strides, dilates, padding_l, padding_r;
  bool winograd;  // the data backward's algorithm (dnnl_common.hpp's choice, as the gradient's)
};

// A stack of weights as one oneDNN convolution: the blocks side by side along the input channels and
// stacked along the output channels, laid out once in the order oneDNN's kernels want. Caffe's blocks hold
// the whole batch each (block-major); oneDNN wants each image's blocks together: with several images the
// blocks are gathered and scattered around the call.
class DnnlProduct : public StackedProduct {
 public:
  DnnlProduct(const Geometry& g, const WeightStack& stack, std::shared_ptr<Workspace> workspace)
      : g_(g),
        in_blocks_(stack.in_blocks),
        out_blocks_(stack.out_blocks),
        bias_(stack.bias),
        workspace_(std::move(workspace)) {
    const std::int64_t kk = g.kernel[0] * g.kernel[1], row = std::int64_t(in_blocks_) * g.channels * kk;
    weights_.resize(out_blocks_ * g.outputs * row);
    for (int j = 0; j < out_blocks_; ++j)
      for (int i = 0; i < in_blocks_; ++i) {
        const float* block = stack.blocks[j * in_blocks_ + i]->data();
        for (std::int64_t o = 0; o < g.outputs; ++o)
          std::memcpy(&weights_[(j * g.outputs + o) * row + i * g.channels * kk], block + o * g.channels * kk,
                      g.channels * kk * sizeof(float));
      }
  }

  void forward(int images, const float* x, float* z) override {
    if (forward_images_ != images) build_forward(images);
    dnnl::stream stream(cpu_engine());
    const float* src = gather(x, in_blocks_, images, g_.channels * g_.height * g_.width);
    float* dst = scatter_target(z, out_blocks_, images);
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, forward_src_.in(stream, src)},
        {DNNL_ARG_WEIGHTS, weights(stream, forward_weights_)},
        {DNNL_ARG_DST, forward_dst_.out(dst)},
        {DNNL_ARG_SCRATCHPAD, scratchpad(forward_pd_.scratchpad_desc())}};
    if (!bias_.empty())
      args[DNNL_ARG_BIAS] = dnnl::memory(forward_pd_.bias_desc(), cpu_engine(), bias_.data());
    forward_.execute(stream, args);
    forward_dst_.back(stream, dst);
    stream.wait();
    scatter(dst, z, out_blocks_, images, g_.outputs * g_.out_h * g_.out_w);
  }

  void backward_data(int images, const float* s, float* c) override {
    if (backward_images_ != images) build_backward(images);
    dnnl::stream stream(cpu_engine());
    const float* diff_dst = gather(s, out_blocks_, images, g_.outputs * g_.out_h * g_.out_w);
    float* diff_src = scatter_target(c, in_blocks_, images);
    backward_.execute(stream, {{DNNL_ARG_DIFF_DST, backward_diff_dst_.in(stream, diff_dst)},
                               {DNNL_ARG_WEIGHTS, weights(stream, backward_weights_)},
                               {DNNL_ARG_DIFF_SRC, backward_diff_src_.out(diff_src)},
                               {DNNL_ARG_SCRATCHPAD, scratchpad(backward_pd_.scratchpad_desc())}});
    backward_diff_src_.back(stream, diff_src);
    stream.wait();
    scatter(diff_src, c, in_blocks_, images, g_.channels * g_.height * g_.width);
  }

 private:
  using desc = dnnl::memory::desc;
  using tag = dnnl::memory::format_tag;

  desc src(int images, tag layout) const {
    return desc({images, in_blocks_ * g_.channels, g_.height, g_.width}, dnnl::memory::data_type::f32,
                layout);
  }
  desc dst(int images, tag layout) const {
    return desc({images, out_blocks_ * g_.outputs, g_.out_h, g_.out_w}, dnnl::memory::data_type::f32, layout);
  }
  desc weights_desc(tag layout) const {
    return desc({out_blocks_ * g_.outputs, in_blocks_ * g_.channels, g_.kernel[0], g_.kernel[1]},
                dnnl::memory::data_type::f32, layout);
  }
  dnnl::convolution_forward::primitive_desc forward_desc(int images, dnnl::prop_kind kind, bool bias) const {
    const dnnl::primitive_attr attr = user_scratchpad();
    const auto a = dnnl::algorithm::convolution_direct;
    const desc b({out_blocks_ * g_.outputs}, dnnl::memory::data_type::f32, tag::x);
    return dnnl::convolution_forward::primitive_desc(
        bias ? dnnl::convolution_forward::desc(kind, a, src(images, tag::any), weights_desc(tag::any), b,
                                               dst(images, tag::any), g_.strides, g_.dilates, g_.padding_l,
                                               g_.padding_r)
             : dnnl::convolution_forward::desc(kind, a, src(images, tag::any), weights_desc(tag::any),
                                               dst(images, tag::any), g_.strides, g_.dilates, g_.padding_l,
                                               g_.padding_r),
        attr, cpu_engine());
  }
  static dnnl::primitive_attr user_scratchpad() {
    dnnl::primitive_attr attr;  // the workspace's scratchpad: oneDNN's own would tie it to one thread
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    return attr;
  }

  void build_forward(int images) {
    forward_pd_ = forward_desc(images, dnnl::prop_kind::forward_inference, !bias_.empty());
    forward_ = dnnl::convolution_forward(forward_pd_);
    forward_src_ =
        Layout(src(images, tag::nchw), forward_pd_.src_desc(), workspace_.get(), Workspace::kInput);
    forward_dst_ =
        Layout(dst(images, tag::nchw), forward_pd_.dst_desc(), workspace_.get(), Workspace::kOutput);
    forward_weights_ =
        Layout(weights_desc(tag::oihw), forward_pd_.weights_desc(), nullptr, Workspace::kInput);
    forward_weights_ready_ = false;
    forward_images_ = images;
  }
  void build_backward(int images) {
    const auto hint = forward_desc(images, dnnl::prop_kind::forward_training, false);
    const auto make = [&](dnnl::algorithm algorithm) {
      return dnnl::convolution_backward_data::primitive_desc(
          dnnl::convolution_backward_data::desc(algorithm, src(images, tag::any), weights_desc(tag::any),
                                                dst(images, tag::any), g_.strides, g_.dilates, g_.padding_l,
                                                g_.padding_r),
          user_scratchpad(), cpu_engine(), hint);
    };
    try {  // oneDNN has Winograd on avx512_core only: elsewhere the direct kernel
      backward_pd_ =
          make(g_.winograd ? dnnl::algorithm::convolution_winograd : dnnl::algorithm::convolution_direct);
    } catch (const dnnl::error&) {
      if (!g_.winograd) throw;
      backward_pd_ = make(dnnl::algorithm::convolution_direct);
    }
    backward_ = dnnl::convolution_backward_data(backward_pd_);
    backward_diff_dst_ =
        Layout(dst(images, tag::nchw), backward_pd_.diff_dst_desc(), workspace_.get(), Workspace::kInput);
    backward_diff_src_ =
        Layout(src(images, tag::nchw), backward_pd_.diff_src_desc(), workspace_.get(), Workspace::kOutput);
    backward_weights_ =
        Layout(weights_desc(tag::oihw), backward_pd_.weights_desc(), nullptr, Workspace::kInput);
    backward_weights_ready_ = false;
    backward_images_ = images;
  }

  // The weights in `layout`: reordered once per build, then kept.
  dnnl::memory weights(dnnl::stream& stream, const Layout& layout) {
    bool& ready = &layout == &forward_weights_ ? forward_weights_ready_ : backward_weights_ready_;
    if (!layout.kept()) return dnnl::memory(weights_desc(tag::oihw), cpu_engine(), weights_.data());
    if (!ready) layout.in(stream, weights_.data()), ready = true;
    return layout.kept();
  }

  // Block-major (blocks x images x per) to each image's blocks together, where the two differ.
  const float* gather(const float* data, int blocks, int images, std::int64_t per) {
    if (blocks == 1 || images == 1) return data;
    float* out =
        static_cast<float*>(workspace_->get(Workspace::kStack, blocks * images * per * sizeof(float)));
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < images; ++n)
      for (int b = 0; b < blocks; ++b)
        std::memcpy(out + (std::int64_t(n) * blocks + b) * per, data + (std::int64_t(b) * images + n) * per,
                    per * sizeof(float));
    return out;
  }
  float* scatter_target(float* data, int blocks, int images) {
    if (blocks == 1 || images == 1) return data;
    const std::int64_t floats =
        std::int64_t(blocks) * images *
        std::max(g_.channels * g_.height * g_.width, g_.outputs * g_.out_h * g_.out_w);
    return static_cast<float*>(workspace_->get(Workspace::kColumns, floats * sizeof(float)));
  }
  void scatter(const float* from, float* data, int blocks, int images, std::int64_t per) {
    if (blocks == 1 || images == 1) return;
#pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < images; ++n)
      for (int b = 0; b < blocks; ++b)
        std::memcpy(data + (std::int64_t(b) * images + n) * per, from + (std::int64_t(n) * blocks + b) * per,
                    per * sizeof(float));
  }
  dnnl::memory scratchpad(const desc& d) {
    return dnnl::memory(d, cpu_engine(), workspace_->get(Workspace::kScratchpad, d.get_size()));
  }

  Geometry g_;
  int in_blocks_, out_blocks_;
  std::vector<float> weights_, bias_;  // plain (out_blocks x outputs, in_blocks x channels, kh, kw)
  std::shared_ptr<Workspace> workspace_;
  int forward_images_ = 0, backward_images_ = 0;
  bool forward_weights_ready_ = false, backward_weights_ready_ = false;
  dnnl::convolution_forward::primitive_desc forward_pd_;
  dnnl::convolution_forward forward_;
  Layout forward_src_, forward_dst_, forward_weights_;
  dnnl::convolution_backward_data::primitive_desc backward_pd_;
  dnnl::convolution_backward_data backward_;
  Layout backward_diff_dst_, backward_diff_src_, backward_weights_;
};

}  // namespace
#endif  // FASTSAL_WITH_DNNL

LinearOps RuleConvolutionLayer::ops(const caffe::Blob<float>& bottom) {
  LinearOps ops;
  ops.outputs = this->num_output_;
  ops.weight_count = this->blobs_[0]->count();
  ops.images = this->num_;
  ops.in_per_image = this->bottom_dim_;
  ops.out_per_image = this->top_dim_;
  ops.geometry = bottom.shape();
  ops.geometry.erase(ops.geometry.begin());
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
  const int out_h = this->output_shape_[0], out_w = this->output_shape_[1];
  const bool one_by_one = this->is_1x1_;
  const std::int64_t column_floats = std::int64_t(kernel_dim) * groups * spatial;
  columns_.resize(one_by_one ? 0 : column_floats);
  float* columns = columns_.data();
  ops.forward = [=](const float* x, const float* w, const float* b, float* z) {
    for (int n = 0; n < images; ++n) {
      const float* col = x + n * bottom_dim;
      if (!one_by_one)
        im2col_on_cores(col, channels, height, width, kernel, pad, stride, dilation, out_h, out_w, columns),
            col = columns;
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
#ifdef FASTSAL_WITH_DNNL
  if (workspace_ && groups == 1) {
    // oneDNN sizes the output from the right padding; where that cannot give Caffe's (floored) size,
    // Caffe's products stay.
    Geometry g{channels,
               height,
               width,
               this->num_output_,
               out_h,
               out_w,
               {kernel[0], kernel[1]},
               {stride[0], stride[1]},
               {dilation[0] - 1, dilation[1] - 1},
               {pad[0], pad[1]},
               {0, 0},
               winograd_pays(kernel, stride, dilation, groups, std::int64_t(out_h) * out_w)};
    const int in_size[2] = {height, width}, out_size[2] = {out_h, out_w};
    bool sizes_agree = true;
    for (int a = 0; a < 2; ++a) {
      const int extent = (kernel[a] - 1) * dilation[a] + 1;
      g.padding_r[a] = std::max(0, (out_size[a] - 1) * stride[a] + extent - in_size[a] - pad[a]);
      sizes_agree =
          sizes_agree && (in_size[a] + pad[a] + g.padding_r[a] - extent) / stride[a] + 1 == out_size[a];
    }
    if (sizes_agree) {
      const std::shared_ptr<Workspace> workspace = workspace_;
      ops.stacked = [g, workspace](const WeightStack& stack) -> std::unique_ptr<StackedProduct> {
        return std::make_unique<DnnlProduct>(g, stack, workspace);
      };
    }
  }
#endif
  return ops;
}

void RuleConvolutionLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                       const std::vector<caffe::Blob<float>*>& top) {
  if (bottom.size() != 1) throw std::invalid_argument("an LRP rule needs a convolution with one input");
  const LinearOps o = ops(*bottom[0]);
  const float* w = this->blobs_[0]->cpu_data();
  const float* b = this->bias_term_ ? this->blobs_[1]->cpu_data() : nullptr;
#ifdef FASTSAL_WITH_DNNL
  if (dnnl_forward_ && o.stacked) {  // the inexact mode: oneDNN's forward
    if (!forward_ || forward_geometry_ != o.geometry) {
      WeightStack own;
      own.blocks = {std::make_shared<const std::vector<float>>(w, w + this->blobs_[0]->count())};
      if (b) own.bias.assign(b, b + this->num_output_);
      forward_ = o.stacked(own), forward_geometry_ = o.geometry;
    }
    forward_->forward(o.images, bottom[0]->cpu_data(), top[0]->mutable_cpu_data());
  } else
#endif
  {
    // Caffe's forward through the same products (gemm.hpp gives Caffe's sums, bit for bit, on fastsal's
    // threads: OpenBLAS's own pool would fight them); its output is also the rule's z unless BN is merged.
    o.forward(bottom[0]->cpu_data(), w, b, top[0]->mutable_cpu_data());
  }
  if (!rule_.prepared()) {  // once: the weights the rule uses
    std::vector<float> scale, shift;
    if (norm_) batch_norm_affine(*norm_, scale_, &scale, &shift);
    rule_.prepare(o, w, b, scale, shift);
  }
  rule_.forward(o, bottom[0]->cpu_data(), norm_ ? nullptr : top[0]->cpu_data());
}

void RuleConvolutionLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                        const std::vector<bool>& propagate_down,
                                        const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  rule_.backward(ops(*bottom[0]), bottom[0]->cpu_data(), top[0]->cpu_diff(), bottom[0]->mutable_cpu_diff());
}

std::int64_t RuleConvolutionLayer::rule_floats_per_image() const {
  return rule_.floats_per_image(this->bottom_dim_, this->top_dim_);
}

std::int64_t RuleConvolutionLayer::rule_scratch_floats_per_image() const {
  return rule_.scratch_floats_per_image(this->bottom_dim_, this->top_dim_);
}

}  // namespace fastsal::layers
