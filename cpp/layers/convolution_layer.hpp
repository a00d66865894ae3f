// Caffe's convolution whose backward follows an LRP rule (lrp_rule.hpp) instead of the gradient: the rule's
// products are Caffe's own im2col GEMMs with the rule's modified weights. Forward is Caffe's.
#pragma once

#include <caffe/layers/conv_layer.hpp>
#include <vector>

#include "layers/lrp_rule.hpp"

namespace fastsal::layers {

class RuleConvolutionLayer : public caffe::ConvolutionLayer<float> {
 public:
  RuleConvolutionLayer(const caffe::LayerParameter& param, Rule rule)
      : caffe::ConvolutionLayer<float>(param), rule_(std::move(rule)) {}

  // zennit's BatchNorm canonizer: a test-time BatchNorm (and the Scale after it) applied in place to this
  // layer's output is merged into the weights the rule uses. Their blobs are read at the first forward.
  void merge_batch_norm(caffe::Layer<float>* norm, caffe::Layer<float>* scale) {
    norm_ = norm, scale_ = scale;
  }
  std::int64_t rule_floats_per_image() const;
  void reload_weights() { rule_.invalidate(); }  // see SaliencyNet::reload_weights

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  LinearOps ops(const caffe::Blob<float>& bottom, const caffe::Blob<float>& top);
  LinearRule rule_;
  std::vector<float> columns_;  // one image's im2col
  caffe::Layer<float>* norm_ = nullptr;
  caffe::Layer<float>* scale_ = nullptr;
};

// The per-channel affine map y = scale * x + shift of a test-time BatchNorm (Caffe's: its statistics divided
// by the scale-factor blob) followed by an optional Scale layer (null).
void batch_norm_affine(caffe::Layer<float>& norm, caffe::Layer<float>* scale, std::vector<float>* a,
                       std::vector<float>* c);

}  // namespace fastsal::layers
