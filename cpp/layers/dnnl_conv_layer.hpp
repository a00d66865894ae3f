// Convolution through oneDNN: the data backward always (the same gradients, rounded otherwise), the
// forward on request (not exact), each in the blocked layouts oneDNN's fastest kernels want; and Caffe's
// exact forward with its im2col spread over the cores.
#pragma once

#ifdef FASTSAL_WITH_DNNL
#include <algorithm>
#include <caffe/layers/conv_layer.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>
#include <utility>
#include <vector>

#include "layers/batch_norm_layer.hpp"
#include "layers/dnnl_common.hpp"
#include "layers/scale_layer.hpp"

namespace fastsal::layers {

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

// Convolution through oneDNN, in the blocked layouts its fastest kernels want (reordered from and to
// Caffe's NCHW around each call). The data-only backward always: it applies the forward's fixed
// masks, so another summation order changes only rounding. The forward only on request (not exact):
// a forward computed in another order rounds differently, and at ReLU's kink and max pooling's
// near-ties that rounding reroutes whole gradients.
// `bf16_forward` (forward-only nets: scores, no gradient) runs that forward in bf16 where the CPU has AMX.
class DnnlConvolutionLayer : public caffe::ConvolutionLayer<float> {
 public:
  DnnlConvolutionLayer(const caffe::LayerParameter& param, bool forward, bool bf16_forward,
                       bool bf16_backward, std::shared_ptr<Workspace> workspace)
      : caffe::ConvolutionLayer<float>(param),
        dnnl_forward_(forward),
        bf16_forward_(forward && bf16_forward),
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
  bool folds_forward() const { return fold_forward_; }
  // A plain ReLU in place on the output, applied by the forward primitive (a post-op) while the output is
  // hot; the ReLU layer then skips its forward. Forward-only nets: the backward would need its mask.
  bool fuse_relu() {
    if (!usable_ || !dnnl_forward_) return false;
    if (!fused_relu_) fused_relu_ = true, primed_shape_.clear();
    return true;
  }
  // The layout the oneDNN forward, as built, reads its input (bottom) or writes its output in, where it
  // is one of oneDNN's channel-blocked ones or NHWC (tag::undef otherwise): a blob that holds it spares
  // the reorder (a bf16 forward's input then only converts, element for element).
  dnnl::memory::format_tag chosen_layout(bool bottom) const;
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

  // The weights changed in place: fold and reorder them again at the next pass (each forward does too).
  void reload_weights() { weights_current_ = false; }

  void Reshape(const std::vector<caffe::Blob<float>*>& bottom,
               const std::vector<caffe::Blob<float>*>& top) override;

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool weight_gradients() const {
    return this->param_propagate_down_[0] || (this->bias_term_ && this->param_propagate_down_[1]);
  }

  // The weights as `layout` wants them, folded or not. Blocked copies are refreshed once per forward
  // pass (the user may change the weights between calls); the K backward passes that follow reuse them.
  dnnl::memory weights_in(dnnl::stream& stream, const Layout& layout, bool folded);
  const float* weights(bool folded) const {
    return folded ? folded_weights_.data() : this->blobs_[0]->cpu_data();
  }

  // W * f and (b - mean) * f + beta per output channel, f = gamma / deviation.
  void fold_weights();

  void build_primitives(const caffe::Blob<float>& bottom, const caffe::Blob<float>& top);

  // The data backward as `arithmetic` says, or the direct fp32 kernel where oneDNN has no such primitive.
  // The diff it writes is fp32 either way; a bf16 primitive reads bf16 copies of the diff and weights.
  dnnl::convolution_backward_data::primitive_desc backward_primitive(
      const BackwardArithmetic& arithmetic, const dnnl::memory::dims& src_dims,
      const dnnl::memory::dims& weight_dims, const dnnl::memory::dims& dst_dims,
      const dnnl::memory::dims& strides, const dnnl::memory::dims& dilates,
      const dnnl::memory::dims& padding_l, const dnnl::memory::dims& padding_r,
      const dnnl::primitive_attr& attr) const;

  // Caffe's forward, GEMM for GEMM (gemm.hpp: on fastsal's threads, bit for bit Caffe's), with its
  // single-threaded im2col (VGG-16 writes 330 MB of columns per image) spread over the cores.
  void exact_forward(const std::vector<caffe::Blob<float>*>& bottom,
                     const std::vector<caffe::Blob<float>*>& top);

  dnnl::memory scratchpad(const dnnl::memory::desc& desc) {
    return dnnl::memory(desc, cpu_engine(), workspace_->get(Workspace::kScratchpad, desc.get_size()));
  }

  bool dnnl_forward_, bf16_forward_, bf16_backward_;
  std::shared_ptr<Workspace> workspace_;
  std::vector<float> ones_;
  std::vector<int> primed_shape_;
  bool usable_ = false;
  bool weights_current_ = false;  // the folded weights; and each blocked copy below
  bool forward_weights_current_ = false, backward_weights_current_ = false;
  const BatchNormLayer* norm_ = nullptr;
  const ScaleLayer* scale_ = nullptr;
  bool fold_forward_ = false, fold_backward_ = false;
  bool fused_relu_ = false;
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

}  // namespace fastsal::layers
#endif  // FASTSAL_WITH_DNNL
