// Caffe's convolution whose backward follows an LRP rule (lrp_rule.hpp) instead of the gradient: the rule's
// products are oneDNN's convolutions over stacked modified weights (2-D, one group), else Caffe's own
// im2col GEMMs. Forward is Caffe's (or oneDNN's when not exact).
#pragma once

#include <caffe/layers/conv_layer.hpp>
#include <memory>
#include <vector>

#include "layers/dnnl_common.hpp"
#include "layers/lrp_rule.hpp"

namespace fastsal::layers {

class RuleConvolutionLayer : public caffe::ConvolutionLayer<float> {
 public:
  RuleConvolutionLayer(const caffe::LayerParameter& param, Rule rule, std::shared_ptr<RuleScratch> scratch)
      : caffe::ConvolutionLayer<float>(param), rule_(std::move(rule), std::move(scratch)) {}

#ifdef FASTSAL_WITH_DNNL
  // The rule's products through oneDNN where it has the layer's convolution; with `forward`, the layer's
  // own forward too (rounded otherwise than Caffe's: the inexact mode).
  void use_onednn(std::shared_ptr<Workspace> workspace, bool forward) {
    workspace_ = std::move(workspace), dnnl_forward_ = forward;
  }
#endif

  // zennit's BatchNorm canonizer: a test-time BatchNorm (and the Scale after it) applied in place to this
  // layer's output is merged into the weights the rule uses. Their blobs are read at the first forward.
  void merge_batch_norm(caffe::Layer<float>* norm, caffe::Layer<float>* scale) {
    norm_ = norm, scale_ = scale;
  }
  std::int64_t rule_floats_per_image() const;
  // SaliencyNet::reload_weights: the rule's weights and the inexact forward's copy are rebuilt from the
  // blobs.
  void reload_weights() {
    rule_.invalidate();
#ifdef FASTSAL_WITH_DNNL
    forward_.reset();
#endif
  }
  std::int64_t rule_scratch_floats_per_image() const;

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  LinearOps ops(const caffe::Blob<float>& bottom);
  LinearRule rule_;
  std::vector<float> columns_;  // one image's im2col
  caffe::Layer<float>* norm_ = nullptr;
  caffe::Layer<float>* scale_ = nullptr;
#ifdef FASTSAL_WITH_DNNL
  std::shared_ptr<Workspace> workspace_;  // null: Caffe's products
  bool dnnl_forward_ = false;
  std::unique_ptr<StackedProduct> forward_;  // the layer's own forward (inexact mode)
  std::vector<int> forward_geometry_;
#endif
};

// caffe::im2col_cpu's columns of one image (channels x kernel x output pixels), a channel per task over
// the cores: Caffe's runs on one (VGG-16 writes 330 MB of columns per image).
void im2col_on_cores(const float* image, int channels, int height, int width, const int* kernel,
                     const int* pad, const int* stride, const int* dilation, int out_h, int out_w,
                     float* columns);

// The per-channel affine map y = scale * x + shift of a test-time BatchNorm (Caffe's: its statistics divided
// by the scale-factor blob) followed by an optional Scale layer (null).
void batch_norm_affine(caffe::Layer<float>& norm, caffe::Layer<float>* scale, std::vector<float>* a,
                       std::vector<float>* c);

}  // namespace fastsal::layers
