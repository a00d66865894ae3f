// DeepLIFT's Rescale rule (Shrikumar et al. 2017, as Captum's DeepLift computes it): each nonlinearity's
// backward multiplies by (f(x) - f(x0)) / (x - x0) instead of f'(x), x0 its value for the reference input.
// The engine forwards a batch's baselines first (the layers keep what the rule needs of them), then its
// images (the layers turn that into multipliers), then runs one backward per class on those.
#pragma once

#include <boost/shared_ptr.hpp>
#include <caffe/layer.hpp>
#include <caffe/layers/pooling_layer.hpp>
#include <cstdint>
#include <memory>
#include <vector>

#include "layers/pooling_layer.hpp"

namespace fastsal::layers {

// Which forward the net is running, shared by the net and its DeepLIFT layers: kPlain (scores only: the
// layers keep nothing), the reference's, or the input's (which sets the multipliers of the next backwards).
enum class DeepLiftPass { kPlain, kReference, kInput };
using DeepLiftState = std::shared_ptr<DeepLiftPass>;

// Captum's eps: below this |x - x0| the multiplier falls back to the gradient.
inline constexpr float kDeepLiftEps = 1e-10f;

// An element-wise activation (ReLU, leaky ReLU, Sigmoid, TanH, ELU) whose backward is the Rescale rule:
// m = (f(x) - f(x0)) / (x - x0), f'(x) where |x - x0| < eps (computed in double). It wraps the layer that
// runs the forward (Caffe's values, bit for bit); in place or not, it reads x before that layer overwrites
// it.
class RescaleLayer : public caffe::Layer<float> {
 public:
  RescaleLayer(boost::shared_ptr<caffe::Layer<float>> inner, DeepLiftState state);

  void Reshape(const std::vector<caffe::Blob<float>*>& bottom,
               const std::vector<caffe::Blob<float>*>& top) override;
  const char* type() const override { return inner_->type(); }
  // Floats kept per image between the forwards and the backwards.
  std::int64_t floats_per_image() const { return per_image_; }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  enum class Kind { kReLU, kSigmoid, kTanH, kELU };
  // In double: f(x) - f(x0) cancels where x is near x0, and float32 would lose its digits there.
  double f(double x) const;
  double derivative(double x) const;

  boost::shared_ptr<caffe::Layer<float>> inner_;
  DeepLiftState state_;
  Kind kind_;
  float parameter_ = 0.f;  // ReLU's negative slope, ELU's alpha
  std::int64_t per_image_ = 0;
  // The reference's x0 after the reference forward; the multipliers m after the input's.
  std::vector<float> kept_;
  bool multipliers_ = false;
};

// Max pooling with Captum's rule: per window, y and r the maxima of the input and the reference, y - r
// goes to the input's maximum where y >= r, else to the reference's (Captum's cross maximum), and each
// position's sum is divided by x - x0 there (the gradient where |x - x0| < eps). Average pooling is linear
// and keeps its gradient. Forward and overflow checks are PoolingLayer's.
class RescalePoolingLayer : public PoolingLayer {
 public:
  RescalePoolingLayer(const caffe::LayerParameter& param, DeepLiftState state)
      : PoolingLayer(param), state_(std::move(state)) {}

  void Reshape(const std::vector<caffe::Blob<float>*>& bottom,
               const std::vector<caffe::Blob<float>*>& top) override;
  std::int64_t floats_per_image() const { return per_image_; }

 protected:
  void Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                   const std::vector<caffe::Blob<float>*>& top) override;
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;

 private:
  DeepLiftState state_;
  std::int64_t per_image_ = 0;
  // After the reference forward: x0, r and the reference's argmax; after the input's: x - x0, the share
  // of each window that goes to the input's maximum (max(y, r) - r) and to the reference's (y - max(y, r)).
  std::vector<float> delta_in_, to_input_, to_reference_;
  std::vector<int> reference_index_;
  bool multipliers_ = false;
};

}  // namespace fastsal::layers
