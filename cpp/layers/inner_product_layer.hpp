// Caffe's InnerProduct layer through fastsal's products: gemm.hpp's (Caffe's, on fastsal's threads) or
// inner_product.hpp's streaming ones.
#pragma once

#include <caffe/layers/inner_product_layer.hpp>
#include <cstdint>
#include <memory>
#include <vector>

#include "layers/lrp_rule.hpp"

namespace fastsal::layers {

// Fully connected layers through inner_product.hpp's streaming products: the data backward always (its
// order of summation is free: the forward's masks are fixed), the forward only when not exact.
class InnerProductLayer : public caffe::InnerProductLayer<float> {
 public:
  InnerProductLayer(const caffe::LayerParameter& param, bool forward)
      : caffe::InnerProductLayer<float>(param), streamed_forward_(forward) {}

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  bool streamed_forward_;
  std::vector<float> ones_;
};

// A fully connected layer whose backward follows an LRP rule (lrp_rule.hpp) instead of the gradient: the
// rule's products are inner_product.hpp's streaming ones (Caffe's GEMMs for a transposed W) with the rule's
// modified weights. Forward is Caffe's.
class RuleInnerProductLayer : public caffe::InnerProductLayer<float> {
 public:
  RuleInnerProductLayer(const caffe::LayerParameter& param, Rule rule, std::shared_ptr<RuleScratch> scratch)
      : caffe::InnerProductLayer<float>(param), rule_(std::move(rule), std::move(scratch)) {}
  std::int64_t rule_floats_per_image() const { return rule_.floats_per_image(this->K_, this->N_); }
  void reload_weights() { rule_.invalidate(); }  // see SaliencyNet::reload_weights
  std::int64_t rule_scratch_floats_per_image() const {
    return rule_.scratch_floats_per_image(this->K_, this->N_);
  }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  LinearOps ops() const;
  LinearRule rule_;
};

}  // namespace fastsal::layers
