#include "layers/deeplift_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastsal::layers {

namespace {

void check_forwards(bool multipliers, const std::string& layer) {
  if (!multipliers)
    throw std::logic_error("layer '" + layer +
                           "': DeepLIFT's backward needs a reference forward and an input forward first");
}

}  // namespace

RescaleLayer::RescaleLayer(boost::shared_ptr<caffe::Layer<float>> inner, DeepLiftState state)
    : caffe::Layer<float>(inner->layer_param()), inner_(std::move(inner)), state_(std::move(state)) {
  const std::string type = inner_->type();
  if (type == "ReLU") {
    kind_ = Kind::kReLU, parameter_ = this->layer_param_.relu_param().negative_slope();
  } else if (type == "Sigmoid") {
    kind_ = Kind::kSigmoid;
  } else if (type == "TanH") {
    kind_ = Kind::kTanH;
  } else if (type == "ELU") {
    kind_ = Kind::kELU, parameter_ = this->layer_param_.elu_param().alpha();
  } else {
    throw std::invalid_argument("DeepLIFT's Rescale rule has no formula for a " + type + " layer");
  }
}

void RescaleLayer::Reshape(const std::vector<caffe::Blob<float>*>& bottom,
                           const std::vector<caffe::Blob<float>*>& top) {
  inner_->Reshape(bottom, top);
  per_image_ = bottom[0]->count(1);
}

double RescaleLayer::f(double x) const {
  switch (kind_) {
    case Kind::kReLU:
      return std::max(x, 0.) + parameter_ * std::min(x, 0.);
    case Kind::kSigmoid:
      return 1. / (1. + std::exp(-x));
    case Kind::kTanH:
      return std::tanh(x);
    case Kind::kELU:
      return x > 0. ? x : parameter_ * std::expm1(x);
  }
  return x;
}

double RescaleLayer::derivative(double x) const {  // as PyTorch's backward of each module
  switch (kind_) {
    case Kind::kReLU:
      return x > 0. ? 1. : parameter_;
    case Kind::kSigmoid: {
      const double s = f(x);
      return s * (1. - s);
    }
    case Kind::kTanH: {
      const double t = std::tanh(x);
      return 1. - t * t;
    }
    case Kind::kELU:
      return x > 0. ? 1. : parameter_ * std::exp(x);
  }
  return 1.;
}

void RescaleLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                               const std::vector<caffe::Blob<float>*>& top) {
  const std::int64_t count = bottom[0]->count();
  const float* x = bottom[0]->cpu_data();  // read before the inner layer may overwrite it in place
  const DeepLiftPass pass = *state_;
  if (pass == DeepLiftPass::kReference) {
    kept_.assign(x, x + count);
  } else if (pass == DeepLiftPass::kInput) {
    if (static_cast<std::int64_t>(kept_.size()) != count)
      throw std::logic_error("layer '" + this->layer_param_.name() +
                             "': the input forward's batch differs from the reference's");
    float* m = kept_.data();
#pragma omp parallel for schedule(static) if (count >= (1 << 16))
    for (std::int64_t i = 0; i < count; ++i) {
      const double delta = double(x[i]) - m[i];  // exact, as float32's x - x0 is for nearby values
      m[i] =
          static_cast<float>(std::abs(delta) < kDeepLiftEps ? derivative(x[i]) : (f(x[i]) - f(m[i])) / delta);
    }
  }
  multipliers_ = pass == DeepLiftPass::kInput;
  inner_->Forward(bottom, top);
}

void RescaleLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                const std::vector<bool>& propagate_down,
                                const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  check_forwards(multipliers_, this->layer_param_.name());
  const float* g = top[0]->cpu_diff();
  float* out = bottom[0]->mutable_cpu_diff();  // in place, out is g: element by element is safe
  const float* m = kept_.data();
  const std::int64_t count = bottom[0]->count();
#pragma omp parallel for simd schedule(static) if (count >= (1 << 16))
  for (std::int64_t i = 0; i < count; ++i) out[i] = g[i] * m[i];
}

void RescalePoolingLayer::Reshape(const std::vector<caffe::Blob<float>*>& bottom,
                                  const std::vector<caffe::Blob<float>*>& top) {
  PoolingLayer::Reshape(bottom, top);
  per_image_ = bottom[0]->count(1) + 3 * top[0]->count(1);  // x0 or x - x0; r and both shares; an index
}

void RescalePoolingLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                      const std::vector<caffe::Blob<float>*>& top) {
  PoolingLayer::Forward_cpu(bottom, top);
  const DeepLiftPass pass = *state_;
  multipliers_ = pass == DeepLiftPass::kInput;
  const std::int64_t in_count = bottom[0]->count(), out_count = top[0]->count();
  const float* x = bottom[0]->cpu_data();
  const float* y = top[0]->cpu_data();
  if (pass == DeepLiftPass::kReference) {
    delta_in_.assign(x, x + in_count);
    to_input_.assign(y, y + out_count);
    const int* index = this->max_idx_.cpu_data();
    reference_index_.assign(index, index + out_count);
    return;
  }
  if (pass != DeepLiftPass::kInput) return;
  if (static_cast<std::int64_t>(delta_in_.size()) != in_count)
    throw std::logic_error("layer '" + this->layer_param_.name() +
                           "': the input forward's batch differs from the reference's");
  to_reference_.resize(out_count);
#pragma omp parallel for schedule(static) if (out_count >= (1 << 16))
  for (std::int64_t j = 0; j < out_count; ++j) {
    const float r = to_input_[j], most = std::max(y[j], r);  // Captum's cross maximum
    to_input_[j] = most - r;
    to_reference_[j] = y[j] - most;
  }
#pragma omp parallel for schedule(static) if (in_count >= (1 << 16))
  for (std::int64_t i = 0; i < in_count; ++i) delta_in_[i] = x[i] - delta_in_[i];
}

void RescalePoolingLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                       const std::vector<bool>& propagate_down,
                                       const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0]) return;
  check_forwards(multipliers_, this->layer_param_.name());
  const float* top_diff = top[0]->cpu_diff();
  float* bottom_diff = bottom[0]->mutable_cpu_diff();
  const int* index = this->max_idx_.cpu_data();
  const std::int64_t planes = std::int64_t(top[0]->shape(0)) * this->channels_;
  const std::int64_t top_plane = std::int64_t(this->pooled_height_) * this->pooled_width_;
  const std::int64_t bottom_plane = std::int64_t(this->height_) * this->width_;
#pragma omp parallel for schedule(static) if (planes * bottom_plane >= (1 << 16))
  for (std::int64_t p = 0; p < planes; ++p) {
    float* diff = bottom_diff + p * bottom_plane;
    const float* delta = delta_in_.data() + p * bottom_plane;
    const auto fallback = [delta](int i) { return std::abs(delta[i]) < kDeepLiftEps; };
    std::fill_n(diff, bottom_plane, 0.f);
    for (std::int64_t j = p * top_plane; j < (p + 1) * top_plane; ++j) {
      const float g = top_diff[j];
      const int mine = index[j], theirs = reference_index_[j];  // -1: an overflowed window, refused
      if (mine >= 0) diff[mine] += fallback(mine) ? g : g * to_input_[j];
      if (theirs >= 0 && !fallback(theirs)) diff[theirs] += g * to_reference_[j];
    }
    for (std::int64_t i = 0; i < bottom_plane; ++i)
      if (!fallback(int(i))) diff[i] /= delta[i];
  }
}

}  // namespace fastsal::layers
