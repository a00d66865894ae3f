#include "saliency_engine.hpp"

#include <caffe/util/math_functions.hpp>
#include <glog/logging.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

#include "channel_absmax.hpp"

namespace fastsal {
namespace {

// Building the internal net would repeat every line of the user's net in the log.
class QuietGlog {
 public:
  QuietGlog() : saved_(FLAGS_minloglevel) { FLAGS_minloglevel = std::max(saved_, 2); }
  ~QuietGlog() { FLAGS_minloglevel = saved_; }

 private:
  int saved_;
};

// Caffe's mode is per thread and belongs to the caller (pycaffe's set_mode_*): restore it afterwards.
class CaffeModeScope {
 public:
  explicit CaffeModeScope(caffe::Caffe::Brew mode) : saved_(caffe::Caffe::mode()) { caffe::Caffe::set_mode(mode); }
  ~CaffeModeScope() { caffe::Caffe::set_mode(saved_); }

 private:
  caffe::Caffe::Brew saved_;
};

int last_producer(const caffe::Net<float>& net, const std::string& blob) {
  for (int l = static_cast<int>(net.layers().size()) - 1; l >= 0; --l)
    for (const auto* top : net.top_vecs()[l])
      if (top == net.blob_by_name(blob).get()) return l;
  return -1;
}

int choose_batch_size(const EngineOptions& options, std::size_t bytes_per_image) {
  if (options.batch_size > 0) return options.batch_size;
  const std::size_t fit = options.memory_budget / std::max<std::size_t>(bytes_per_image, 1);
  return static_cast<int>(std::clamp<std::size_t>(fit, 1, 32));
}

}  // namespace

SaliencyEngine::SaliencyEngine(const caffe::Net<float>& user_net, const EngineOptions& options)
    : plan_(plan_saliency_net(user_net, options.input_blob, options.score_blob)),
      batch_size_(choose_batch_size(options, plan_.bytes_per_image)) {
  if (options.batch_size < 0) throw std::invalid_argument("batch_size must be positive");
  {
    QuietGlog quiet;
    net_ = std::make_unique<caffe::Net<float>>(plan_.with_batch_size(batch_size_));
    net_->ShareTrainedLayersWith(&user_net);
  }
  // force_backward turned on every weight gradient; saliency needs only the data gradients.
  for (const auto& layer : net_->layers())
    for (int i = 0; i < static_cast<int>(layer->blobs().size()); ++i) layer->set_param_propagate_down(i, false);
  input_ = net_->blob_by_name(plan_.input_blob).get();
  score_ = net_->blob_by_name(plan_.score_blob).get();
  score_layer_ = last_producer(*net_, plan_.score_blob);
}

std::size_t SaliencyEngine::image_size() const {
  return std::accumulate(plan_.image_shape.begin(), plan_.image_shape.end(), std::size_t(1),
                         std::multiplies<std::size_t>());
}

std::size_t SaliencyEngine::map_size() const { return image_size() / plan_.image_shape[0]; }

void SaliencyEngine::compute(const SaliencyRequest& request) {
  if (request.num_images < 0 || request.classes_per_image < 1)
    throw std::invalid_argument("need at least one class per image");
  if (!request.classes && request.classes_per_image > plan_.num_classes)
    throw std::invalid_argument("top_k=" + std::to_string(request.classes_per_image) + " exceeds the " +
                                std::to_string(plan_.num_classes) + " classes of score blob '" +
                                plan_.score_blob + "'");
  if (request.classes) {
    const std::size_t n = std::size_t(request.num_images) * request.classes_per_image;
    for (std::size_t i = 0; i < n; ++i)
      if (request.classes[i] < 0 || request.classes[i] >= plan_.num_classes)
        throw std::invalid_argument("class " + std::to_string(request.classes[i]) + " is out of range [0, " +
                                    std::to_string(plan_.num_classes) + ")");
  }
  std::lock_guard<std::mutex> lock(mutex_);  // one internal net: one call at a time
  CaffeModeScope mode(caffe::Caffe::CPU);
  for (int first = 0; first < request.num_images; first += batch_size_)
    run_batch(request, first, std::min(batch_size_, request.num_images - first));
}

void SaliencyEngine::run_batch(const SaliencyRequest& request, int first, int count) {
  const int k_count = request.classes_per_image;
  const std::size_t image_floats = image_size(), map_floats = map_size();
  const int channels = plan_.image_shape[0];

  std::vector<int> shape = {count};
  shape.insert(shape.end(), plan_.image_shape.begin(), plan_.image_shape.end());
  input_->Reshape(shape);
  std::copy_n(request.images + first * image_floats, count * image_floats, input_->mutable_cpu_data());
  net_->ForwardFromTo(0, score_layer_);

  // Seeds for this batch: the requested classes, or each image's top-K scores (ties: lower index first).
  batch_classes_.resize(std::size_t(count) * k_count);
  if (request.classes) {
    std::copy_n(request.classes + std::size_t(first) * k_count, batch_classes_.size(), batch_classes_.begin());
  } else {
    const float* scores = score_->cpu_data();
    std::vector<int> order(plan_.num_classes);
    for (int n = 0; n < count; ++n) {
      const float* s = scores + std::size_t(n) * plan_.num_classes;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k_count, order.end(),
                        [s](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      std::copy_n(order.begin(), k_count, batch_classes_.begin() + std::size_t(n) * k_count);
    }
    std::copy(batch_classes_.begin(), batch_classes_.end(), request.top_classes + std::size_t(first) * k_count);
  }

  const ChannelAbsMaxLayout layout{count, channels, static_cast<int>(map_floats),
                                   static_cast<std::ptrdiff_t>(k_count * map_floats)};
  for (int k = 0; k < k_count; ++k) {
    // Backward overwrites bottom diffs, so one forward serves every class (in-place layers may have
    // written the score's diff, so it is re-seeded each time).
    float* seed = score_->mutable_cpu_diff();
    caffe::caffe_set(score_->count(), 0.f, seed);
    for (int n = 0; n < count; ++n)
      seed[std::size_t(n) * plan_.num_classes + batch_classes_[std::size_t(n) * k_count + k]] = 1.f;
    net_->BackwardFromTo(score_layer_, 0);

    const float* gradient = input_->cpu_diff();
    channel_absmax_cpu(gradient, layout, request.maps + (std::size_t(first) * k_count + k) * map_floats);
    if (request.gradients)
      for (int n = 0; n < count; ++n)
        std::copy_n(gradient + n * image_floats, image_floats,
                    request.gradients + ((std::size_t(first) + n) * k_count + k) * image_floats);
  }
}

}  // namespace fastsal
