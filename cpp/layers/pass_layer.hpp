// A layer whose backward passes relevance through unchanged (zennit's Pass rule: activations, LRN, a merged
// BatchNorm and Scale, Dropout): it wraps the layer it replaces, whose forward runs as before.
#pragma once

#include <boost/shared_ptr.hpp>
#include <caffe/layer.hpp>
#include <vector>

namespace fastsal::layers {

class PassLayer : public caffe::Layer<float> {
 public:
  explicit PassLayer(boost::shared_ptr<caffe::Layer<float>> inner)
      : caffe::Layer<float>(inner->layer_param()), inner_(std::move(inner)) {}

  void Reshape(const std::vector<caffe::Blob<float>*>& bottom,
               const std::vector<caffe::Blob<float>*>& top) override {
    inner_->Reshape(bottom, top);
  }
  const char* type() const override { return inner_->type(); }
  caffe::Layer<float>& inner() { return *inner_; }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override {
    inner_->Forward(bottom, top);
  }
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override {
    for (std::size_t i = 0; i < bottom.size() && i < top.size(); ++i)
      if (propagate_down[i] && bottom[i] != top[i])  // in place, the diff already is the relevance
        std::copy_n(top[i]->cpu_diff(), top[i]->count(), bottom[i]->mutable_cpu_diff());
  }

 private:
  boost::shared_ptr<caffe::Layer<float>> inner_;
};

}  // namespace fastsal::layers
