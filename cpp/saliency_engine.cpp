#include "saliency_engine.hpp"

#include <glog/logging.h>

#include <algorithm>
#include <caffe/util/math_functions.hpp>
#include <chrono>
#include <numeric>
#include <stdexcept>
#include <string>

#include "channel_absmax.hpp"
#include "fast_layers.hpp"
#ifdef FASTSAL_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda_kernels.hpp"
#endif

namespace fastsal {

BatchPlan plan_batches(BatchLayout layout, bool on_gpu, int num_images, int classes_per_image,
                       int batch_size) {
  const bool under_filled = num_images < batch_size;
  const bool pairs = layout == BatchLayout::kPairs ||
                     (layout == BatchLayout::kAuto && on_gpu && classes_per_image > 1 && under_filled);
  return {pairs, pairs ? std::max(1, batch_size / classes_per_image) : batch_size};
}

#ifdef FASTSAL_WITH_CUDA
// Grown on demand, freed with the engine. The maps of a batch are reduced on the device, copied to
// pinned memory in one transfer, then into the caller's array.
struct SaliencyEngine::DeviceBuffers {
  int* classes = nullptr;
  float* maps = nullptr;
  float* pinned_maps = nullptr;
  std::size_t class_capacity = 0, map_capacity = 0;

  void reserve(std::size_t classes_needed, std::size_t maps_needed) {
    if (classes_needed > class_capacity) {
      cudaFree(classes);
      cudaMalloc(&classes, classes_needed * sizeof(int));
      class_capacity = classes_needed;
    }
    if (maps_needed > map_capacity) {
      cudaFree(maps);
      cudaFreeHost(pinned_maps);
      cudaMalloc(&maps, maps_needed * sizeof(float));
      cudaMallocHost(&pinned_maps, maps_needed * sizeof(float));
      map_capacity = maps_needed;
    }
    check_cuda("allocating fastsal's device buffers");
  }
  ~DeviceBuffers() {
    cudaFree(classes);
    cudaFree(maps);
    cudaFreeHost(pinned_maps);
  }
};
#else
struct SaliencyEngine::DeviceBuffers {};
#endif

namespace {

// Building the internal net would repeat every line of the user's net in the log.
class QuietGlog {
 public:
  QuietGlog() : saved_(FLAGS_minloglevel) { FLAGS_minloglevel = std::max(saved_, 2); }
  ~QuietGlog() { FLAGS_minloglevel = saved_; }

 private:
  int saved_;
};

// Caffe's mode and device are per thread and belong to the caller (pycaffe's set_mode_*): restore them.
class CaffeModeScope {
 public:
  explicit CaffeModeScope(int device) : saved_(caffe::Caffe::mode()) {
    caffe::Caffe::set_mode(device >= 0 ? caffe::Caffe::GPU : caffe::Caffe::CPU);
#ifdef FASTSAL_WITH_CUDA
    if (device >= 0) caffe::Caffe::SetDevice(device);
#endif
  }
  ~CaffeModeScope() { caffe::Caffe::set_mode(saved_); }

 private:
  caffe::Caffe::Brew saved_;
};

int choose_batch_size(const EngineOptions& options, std::size_t bytes_per_image) {
  if (options.batch_size < 0) throw std::invalid_argument("batch_size must be positive");
  if (options.batch_size > 0) return options.batch_size;
  const std::size_t fit = options.memory_budget / std::max<std::size_t>(bytes_per_image, 1);
  return static_cast<int>(std::clamp<std::size_t>(fit, 1, 16));
}

int checked_device(int device) {
  if (device < 0) return -1;
#ifdef FASTSAL_WITH_CUDA
  const int count = cuda_device_count();
  if (device >= count)
    throw std::invalid_argument("device=" + std::to_string(device) + ", but " +
                                (count ? "there are only " + std::to_string(count) + " CUDA devices"
                                       : std::string("no CUDA device is visible")));
  return device;
#else
  throw std::invalid_argument(
      "device=" + std::to_string(device) +
      ", but fastsal and its Caffe were built without CUDA (fastsal.has_cuda() is False)");
#endif
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

SaliencyEngine::SaliencyEngine(const caffe::Net<float>& user_net, const EngineOptions& options)
    : plan_(plan_saliency_net(user_net, options.input_blob, options.score_blob)),
      batch_size_(choose_batch_size(options, plan_.bytes_per_image)),
      device_(checked_device(options.device)),
      layout_(options.layout),
      device_buffers_(std::make_unique<DeviceBuffers>()) {
  {
    QuietGlog quiet;
    const caffe::NetParameter param = plan_.with_batch_size(batch_size_);
    // fastsal's layers replace CPU code only; on a GPU, Caffe's own (cuDNN's where built) stay.
    net_ = options.fast_layers && device_ < 0 ? std::make_unique<SaliencyNet>(param)
                                              : std::make_unique<caffe::Net<float>>(param);
    net_->ShareTrainedLayersWith(&user_net);
  }
  // force_backward turned on every weight gradient; saliency needs only the data gradients.
  for (const auto& layer : net_->layers())
    for (int i = 0; i < static_cast<int>(layer->blobs().size()); ++i)
      layer->set_param_propagate_down(i, false);
  input_ = net_->blob_by_name(plan_.input_blob).get();
  score_ = net_->blob_by_name(plan_.score_blob).get();
  const auto& names = net_->blob_names();
  score_layer_ = producer_of(
      *net_, static_cast<int>(std::find(names.begin(), names.end(), plan_.score_blob) - names.begin()));
}

SaliencyEngine::~SaliencyEngine() = default;

std::size_t SaliencyEngine::image_size() const {
  return std::accumulate(plan_.image_shape.begin(), plan_.image_shape.end(), std::size_t(1),
                         std::multiplies<std::size_t>());
}

std::size_t SaliencyEngine::map_size() const { return image_size() / plan_.image_shape[0]; }

void SaliencyEngine::check_classes(const SaliencyRequest& request) const {
  if (request.num_images < 0 || request.classes_per_image < 1)
    throw std::invalid_argument("need at least one class per image");
  if (!request.classes && request.classes_per_image > plan_.num_classes)
    throw std::invalid_argument("top_k=" + std::to_string(request.classes_per_image) + " exceeds the " +
                                std::to_string(plan_.num_classes) + " classes of score blob '" +
                                plan_.score_blob + "'");
  if (!request.classes) return;
  const std::size_t n = std::size_t(request.num_images) * request.classes_per_image;
  for (std::size_t i = 0; i < n; ++i)
    if (request.classes[i] < 0 || request.classes[i] >= plan_.num_classes)
      throw std::invalid_argument("class " + std::to_string(request.classes[i]) + " is out of range [0, " +
                                  std::to_string(plan_.num_classes) + ")");
}

void SaliencyEngine::compute(const SaliencyRequest& request) { run(request, nullptr); }

std::vector<LayerTime> SaliencyEngine::profile_layers(const SaliencyRequest& request) {
  std::vector<LayerTime> times;
  run(request, &times);
  return times;
}

void SaliencyEngine::run(const SaliencyRequest& request, std::vector<LayerTime>* times) {
  check_classes(request);
  std::lock_guard<std::mutex> lock(mutex_);  // one internal net: one call at a time
  CaffeModeScope mode(device_);
  if (times) {
    times->resize(score_layer_ + 1);
    for (int l = 0; l <= score_layer_; ++l) (*times)[l] = {net_->layer_names()[l], net_->layers()[l]->type()};
  }
  const BatchPlan batches =
      plan_batches(layout_, device_ >= 0, request.num_images, request.classes_per_image, batch_size_);
  for (int first = 0; first < request.num_images; first += batches.images_per_pass)
    run_batch(request, first, std::min(batches.images_per_pass, request.num_images - first), batches.pairs,
              times);
}

void SaliencyEngine::run_batch(const SaliencyRequest& request, int first, int count, bool pairs,
                               std::vector<LayerTime>* times) {
  const int k_count = request.classes_per_image;
  const std::size_t image_floats = image_size(), map_floats = map_size();
  const int copies = pairs ? k_count : 1;  // rows of the batch per image
  const int rows = count * copies;
  const bool gpu = device_ >= 0;
  caffe::Net<float>& net = *net_;
  const int last = score_layer_;

  std::vector<int> shape = {rows};
  shape.insert(shape.end(), plan_.image_shape.begin(), plan_.image_shape.end());
  input_->Reshape(shape);
  float* input = input_->mutable_cpu_data();  // on a GPU, Caffe uploads it at the first layer
  for (int n = 0; n < count; ++n)
    for (int c = 0; c < copies; ++c)
      std::copy_n(request.images + (first + std::size_t(n)) * image_floats, image_floats,
                  input + (std::size_t(n) * copies + c) * image_floats);
  if (times) {
    for (int l = 0; l <= last; ++l) {
      const auto start = Clock::now();
      net.ForwardFromTo(l, l);
      (*times)[l].forward_seconds += seconds_since(start);
    }
  } else {
    net.ForwardFromTo(0, last);
  }

  // Seeds for this batch, (count, K): the requested classes, or each image's top-K scores (ties: lower
  // id first), ranked from the score row of its first copy.
  batch_classes_.resize(std::size_t(count) * k_count);
  if (request.classes) {
    std::copy_n(request.classes + std::size_t(first) * k_count, batch_classes_.size(),
                batch_classes_.begin());
  } else {
    const float* scores = score_->cpu_data();
    std::vector<int> order(plan_.num_classes);
    for (int n = 0; n < count; ++n) {
      const float* s = scores + std::size_t(n) * copies * plan_.num_classes;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k_count, order.end(),
                        [s](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      std::copy_n(order.begin(), k_count, batch_classes_.begin() + std::size_t(n) * k_count);
    }
    std::copy(batch_classes_.begin(), batch_classes_.end(),
              request.top_classes + std::size_t(first) * k_count);
  }

  // With pairs, row r = (image r / K, class r % K): one backward seeds every row with its own class, and
  // the maps of consecutive rows are consecutive (n, k) slots. Otherwise pass k seeds class k of each image.
  const int passes = pairs ? 1 : k_count;
  const int classes_stride = pairs ? 1 : k_count;
  const ChannelAbsMaxLayout layout{rows, plan_.image_shape[0], static_cast<int>(map_floats),
                                   static_cast<std::ptrdiff_t>((pairs ? 1 : k_count) * map_floats)};
  float* maps = request.maps + std::size_t(first) * k_count * map_floats;
#ifdef FASTSAL_WITH_CUDA
  float* device_maps = nullptr;
  if (gpu) {
    device_buffers_->reserve(batch_classes_.size(), batch_classes_.size() * map_floats);
    cudaMemcpy(device_buffers_->classes, batch_classes_.data(), batch_classes_.size() * sizeof(int),
               cudaMemcpyHostToDevice);
    check_cuda("copying the classes to the device");
    device_maps = device_buffers_->maps;
  }
#endif
  for (int pass = 0; pass < passes; ++pass) {
    // Backward overwrites bottom diffs, so one forward serves every pass (in-place layers may have
    // written the score's diff, so it is re-seeded each time).
    if (gpu) {
#ifdef FASTSAL_WITH_CUDA
      seed_one_hot_gpu(score_->mutable_gpu_diff(), rows, plan_.num_classes, device_buffers_->classes,
                       classes_stride, pass);
#endif
    } else {
      float* seed = score_->mutable_cpu_diff();
      caffe::caffe_set(score_->count(), 0.f, seed);
      for (int r = 0; r < rows; ++r)
        seed[seed_index(r, batch_classes_.data(), plan_.num_classes, classes_stride, pass)] = 1.f;
    }
    if (times) {
      for (int l = last; l >= 0; --l) {
        const auto start = Clock::now();
        net.BackwardFromTo(l, l);
        (*times)[l].backward_seconds += seconds_since(start);
      }
    } else {
      net.BackwardFromTo(last, 0);
    }

    if (gpu) {
#ifdef FASTSAL_WITH_CUDA
      channel_absmax_gpu(input_->gpu_diff(), layout, device_maps + pass * map_floats);
#endif
    } else {
      channel_absmax_cpu(input_->cpu_diff(), layout, maps + pass * map_floats);
    }
    if (request.gradients) {  // the full input gradient; on a GPU this copies it to the host
      const float* gradient = input_->cpu_diff();
      for (int r = 0; r < rows; ++r) {
        const std::size_t slot =
            pairs ? std::size_t(first) * k_count + r : (std::size_t(first) + r) * k_count + pass;
        std::copy_n(gradient + r * image_floats, image_floats, request.gradients + slot * image_floats);
      }
    }
  }
#ifdef FASTSAL_WITH_CUDA
  if (gpu) {  // only the maps cross to the host: one transfer per batch, through pinned memory
    const std::size_t floats = std::size_t(count) * k_count * map_floats;
    cudaMemcpyAsync(device_buffers_->pinned_maps, device_maps, floats * sizeof(float), cudaMemcpyDeviceToHost,
                    0);
    cudaStreamSynchronize(0);
    check_cuda("copying the maps to the host");
    std::copy_n(device_buffers_->pinned_maps, floats, maps);
  }
#endif
}

}  // namespace fastsal
