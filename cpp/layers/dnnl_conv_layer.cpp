#include "layers/dnnl_conv_layer.hpp"

#ifdef FASTSAL_WITH_DNNL
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "gemm.hpp"
#include "layers/convolution_layer.hpp"
#include "layers/parallel.hpp"

namespace fastsal::layers {

namespace {

BackwardArithmetic backward_arithmetic(bool bf16, const int* kernel, const int* stride, const int* dilation,
                                       int group, std::int64_t output_pixels) {
  BackwardArithmetic choice;
  static const bool amx = cpu_has_amx();
  if (bf16 && amx && kernel[0] * kernel[1] > 1) {
    choice.type = dnnl::memory::data_type::bf16;
  } else if (winograd_pays(kernel, stride, dilation, group, output_pixels)) {
    choice.algorithm = dnnl::algorithm::convolution_winograd;
  }
  return choice;
}

}  // namespace

dnnl::memory::format_tag DnnlConvolutionLayer::chosen_layout(bool bottom) const {
  using tag = dnnl::memory::format_tag;
  if (!usable_ || !dnnl_forward_ || weight_gradients()) return tag::undef;
  const dnnl::memory::desc chosen = bottom ? forward_pd_.src_desc() : forward_pd_.dst_desc();
  for (const tag layout : {tag::aBcd16b, tag::aBcd8b, tag::aBcd4b, tag::acdb})
    if (chosen == dnnl::memory::desc(chosen.dims(), chosen.data_type(), layout)) return layout;
  return tag::undef;
}

void DnnlConvolutionLayer::Reshape(const std::vector<caffe::Blob<float>*>& bottom,
                                   const std::vector<caffe::Blob<float>*>& top) {
  caffe::ConvolutionLayer<float>::Reshape(bottom, top);
  if (bottom[0]->shape() == primed_shape_) return;
  primed_shape_ = bottom[0]->shape();
  build_primitives(*bottom[0], *top[0]);
}

void DnnlConvolutionLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                       const std::vector<caffe::Blob<float>*>& top) {
  weights_current_ = false;  // the user may have changed the weights since the last pass
  if (!usable_ || !dnnl_forward_) {
    exact_forward(bottom, top);
    if (fused_relu_)  // a shape oneDNN cannot size: the fused ReLU's values, as Caffe's layer computes them
      for (auto* blob : top) {
        float* data = blob->mutable_cpu_data();
        const std::int64_t count = blob->count();
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
        for (std::int64_t i = 0; i < count; ++i)
          data[i] = std::max(data[i], 0.f) + 0.f * std::min(data[i], 0.f);
      }
    return;
  }
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

void DnnlConvolutionLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                        const std::vector<bool>& propagate_down,
                                        const std::vector<caffe::Blob<float>*>& bottom) {
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

dnnl::memory DnnlConvolutionLayer::weights_in(dnnl::stream& stream, const Layout& layout, bool folded) {
  // Each copy is refreshed at its first use after a forward: a forward-only net never reorders the
  // backward's weights (open_nsfw at 16 rows: 36 reorders, 21 ms a forward).
  if (!weights_current_) {
    if (fold_forward_ || fold_backward_) fold_weights();
    forward_weights_current_ = backward_weights_current_ = false;
    weights_current_ = true;
  }
  bool& current = &layout == &forward_weights_ ? forward_weights_current_ : backward_weights_current_;
  if (!layout.kept()) return layout.in(stream, weights(folded));
  if (!current) layout.in(stream, weights(folded));
  current = true;
  return layout.kept();
}

void DnnlConvolutionLayer::fold_weights() {
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

void DnnlConvolutionLayer::build_primitives(const caffe::Blob<float>& bottom, const caffe::Blob<float>& top) {
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
    padding_r[a] =
        std::max<dnnl::memory::dim>(0, (dst_dims[2 + a] - 1) * stride[a] + extent - src_dims[2 + a] - pad[a]);
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
  const desc dst_any(dst_dims, f32, tag::any), bias(dims{dst_dims[1]}, f32, tag::x);
  const dims strides = {stride[0], stride[1]}, dilates = {dilation[0] - 1, dilation[1] - 1},
             padding_l = {pad[0], pad[1]};
  // The forward direct and fp32, never Winograd or bf16: their rounding reroutes gradients at ReLU's kink
  // (Spearman 0.91 and 0.57 with the exact maps on VGG-16). Forward-only nets (scores, no gradient) may
  // ask for bf16 on AMX (fp32 accumulation and output): their scores move by about 1% of the largest and
  // the perturbation maps keep Spearman >= 0.998 (docs/design.md). The scratchpads are the layer's own:
  // oneDNN's shared one would tie the primitives to the thread that created them.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::primitive_attr forward_attr;  // (a copy of attr would share its handle)
  forward_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (fused_relu_) {
    dnnl::post_ops relu;
    relu.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    forward_attr.set_post_ops(relu);
  }
  static const bool amx = cpu_has_amx();
  for (const auto type : {bf16_forward_ && amx ? dnnl::memory::data_type::bf16 : f32, f32}) {
    const desc src_any(src_dims, type, tag::any), weights_any(weight_dims, type, tag::any);
    const auto forward_desc =
        this->bias_term_ || fold_forward_
            ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                              dnnl::algorithm::convolution_direct, src_any, weights_any, bias,
                                              dst_any, strides, dilates, padding_l, padding_r)
            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training,
                                              dnnl::algorithm::convolution_direct, src_any, weights_any,
                                              dst_any, strides, dilates, padding_l, padding_r);
    forward_pd_ = dnnl::convolution_forward::primitive_desc(forward_desc, forward_attr, cpu_engine());
    // A shape AMX's kernels do not take would run oneDNN's reference code: fp32 then.
    if (type == f32 || std::string(forward_pd_.impl_info_str()).find("amx") != std::string::npos) break;
  }
  backward_pd_ = backward_primitive(
      backward_arithmetic(bf16_backward_, kernel, stride, dilation, this->group_, dst_dims[2] * dst_dims[3]),
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

dnnl::convolution_backward_data::primitive_desc DnnlConvolutionLayer::backward_primitive(
    const BackwardArithmetic& arithmetic, const dnnl::memory::dims& src_dims,
    const dnnl::memory::dims& weight_dims, const dnnl::memory::dims& dst_dims,
    const dnnl::memory::dims& strides, const dnnl::memory::dims& dilates, const dnnl::memory::dims& padding_l,
    const dnnl::memory::dims& padding_r, const dnnl::primitive_attr& attr) const {
  using desc = dnnl::memory::desc;
  const auto any = dnnl::memory::format_tag::any;
  const auto f32 = dnnl::memory::data_type::f32, type = arithmetic.type;
  const desc diff_src(src_dims, f32, any), weights(weight_dims, type, any), diff_dst(dst_dims, type, any);
  try {
    // The forward primitive only hints the layouts; the bf16 one is never run.
    const auto hint =
        type == f32 && forward_pd_.src_desc().data_type() == f32
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

void DnnlConvolutionLayer::exact_forward(const std::vector<caffe::Blob<float>*>& bottom,
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
      if (!this->is_1x1_)
        im2col_on_cores(image, channels, height, width, kernel, pad, stride, dilation, out_h, out_w, columns);
      const float* input = this->is_1x1_ ? image : columns;
      float* output = top[i]->mutable_cpu_data() + std::int64_t(n) * this->top_dim_;
      for (int g = 0; g < group; ++g)  // BaseConvolutionLayer::forward_cpu_gemm's products
        gemm(false, false, rows, spatial, depth, 1.f, weight + std::int64_t(this->weight_offset_) * g,
             input + column_group * g, 0.f, output + output_group * g);
      if (this->bias_term_)  // and forward_cpu_bias's
        gemm(false, false, this->num_output_, spatial, 1, 1.f, this->blobs_[1]->cpu_data(), ones_.data(), 1.f,
             output);
    }
  }
}

}  // namespace fastsal::layers
#endif  // FASTSAL_WITH_DNNL
