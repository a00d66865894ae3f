#include "saliency_engine.hpp"

#include <glog/logging.h>
#include <omp.h>

#include <algorithm>
#include <caffe/util/math_functions.hpp>
#include <chrono>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

#include "channel_reduce.hpp"
#include "class_head.hpp"
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
  return {pairs, batch_size};
}

int balanced_rows(std::int64_t units, int cap) {
  if (units <= 0 || cap <= 0) return std::max(cap, 1);
  const std::int64_t passes = (units + cap - 1) / cap;
  return static_cast<int>((units + passes - 1) / passes);
}

#ifdef FASTSAL_WITH_CUDA
// Grown on demand, freed with the engine. The maps of a batch are reduced on the device, copied to
// pinned memory in one transfer, then into the caller's array. A capacity is recorded only once its
// allocation succeeded, so a caught out-of-memory leaves nothing dangling for the next call.
struct SaliencyEngine::DeviceBuffers {
  int* classes = nullptr;
  float* maps = nullptr;
  float* pinned_maps = nullptr;
  std::size_t class_capacity = 0, map_capacity = 0;

  void reserve(std::size_t classes_needed, std::size_t maps_needed) {
    if (classes_needed > class_capacity) {
      cudaFree(classes);
      classes = nullptr;
      class_capacity = 0;
      check_cuda_call(cudaMalloc(&classes, classes_needed * sizeof(int)),
                      "allocating the classes on the GPU");
      class_capacity = classes_needed;
    }
    if (maps_needed > map_capacity) {
      cudaFree(maps);
      cudaFreeHost(pinned_maps);
      maps = pinned_maps = nullptr;
      map_capacity = 0;
      check_cuda_call(cudaMalloc(&maps, maps_needed * sizeof(float)), "allocating the maps on the GPU");
      check_cuda_call(cudaMallocHost(&pinned_maps, maps_needed * sizeof(float)),
                      "allocating pinned host memory for the maps");
      map_capacity = maps_needed;
    }
  }
  ~DeviceBuffers() {
    cudaFree(classes);
    cudaFree(maps);
    cudaFreeHost(pinned_maps);
  }
};

namespace {
// The weights are the user's memory: their device copy lives where they were first uploaded. A kernel
// on another device cannot read it, so refuse rather than let Caffe fault.
void check_weights_on_device(const caffe::Net<float>& net, int device) {
  for (const auto& blob : net.params()) {
    const auto& memory = blob->data();
    const auto head = memory->head();
    if (head != caffe::SyncedMemory::HEAD_AT_GPU && head != caffe::SyncedMemory::SYNCED) continue;
    cudaPointerAttributes attributes;
    if (cudaPointerGetAttributes(&attributes, memory->gpu_data()) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    if (attributes.device != device)
      throw std::invalid_argument(
          "the net's weights are on CUDA device " + std::to_string(attributes.device) +
          " (where a GPU run uploaded them), but device=" + std::to_string(device) +
          "; use device=" + std::to_string(attributes.device) + " or load the net again for this device");
  }
}
}  // namespace
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

// The calling thread's OpenMP team size for one call, restored after: it sizes fastsal's regions and
// oneDNN's (which also reads it when it creates a primitive, so the constructor sets it too).
class ThreadCountScope {
 public:
  explicit ThreadCountScope(int threads) : saved_(omp_get_max_threads()) {
    if (threads > 0) omp_set_num_threads(threads);
  }
  ~ThreadCountScope() { omp_set_num_threads(saved_); }
  ThreadCountScope(const ThreadCountScope&) = delete;
  ThreadCountScope& operator=(const ThreadCountScope&) = delete;

 private:
  int saved_;
};

// Caffe's mode and device are per thread and belong to the caller (pycaffe's set_mode_*, set_device):
// set them for the call, restore them after. Caffe::SetDevice rebuilds the thread's cuBLAS handle, so
// the device is switched back only when it differs.
class CaffeModeScope {
 public:
  explicit CaffeModeScope(int device) : saved_mode_(caffe::Caffe::mode()), device_(device) {
#ifdef FASTSAL_WITH_CUDA
    if (device >= 0) {
      check_cuda_call(cudaGetDevice(&saved_device_), "reading the current CUDA device");
      caffe::Caffe::SetDevice(device);
    }
#endif
    caffe::Caffe::set_mode(device >= 0 ? caffe::Caffe::GPU : caffe::Caffe::CPU);
  }
  ~CaffeModeScope() {
    caffe::Caffe::set_mode(saved_mode_);
#ifdef FASTSAL_WITH_CUDA
    if (device_ >= 0 && saved_device_ != device_) caffe::Caffe::SetDevice(saved_device_);
#endif
  }

 private:
  caffe::Caffe::Brew saved_mode_;
  int device_;
  int saved_device_ = -1;
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

int layer_index(const caffe::Net<float>& net, const std::string& name) {
  const auto& names = net.layer_names();
  return static_cast<int>(std::find(names.begin(), names.end(), name) - names.begin());
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

SaliencyEngine::SaliencyEngine(const caffe::Net<float>& user_net, const EngineOptions& options)
    : plan_(plan_saliency_net(user_net, options.input_blob, options.score_blob, options.gradient_blob,
                              options.image_shape)),
      device_(checked_device(options.device)),
      threads_(options.threads > 0 ? options.threads : omp_get_max_threads()),
      layout_(options.layout),
      forward_only_(options.forward_only),
      deeplift_(options.deeplift),
      device_buffers_(std::make_unique<DeviceBuffers>()) {
  if (!options.layer_rules.empty() && device_ >= 0)
    throw std::invalid_argument("LRP's rules run on the CPU only; leave device unset");
  if (deeplift_ && device_ >= 0)
    throw std::invalid_argument("DeepLIFT's rules run on the CPU only; leave device unset");
  ThreadCountScope team(threads_);
  {
    QuietGlog quiet;
    CaffeModeScope mode(device_);  // layers set up in the caller's mode could touch a GPU it never meant
    if (forward_only_) plan_.param.set_force_backward(false);  // no layer needs a diff
    // At batch 1; every batch resizes the input. fastsal's speed swaps replace CPU code only: on a GPU,
    // Caffe's own layers (cuDNN's where built) run.
    net_ = std::make_unique<SaliencyNet>(
        plan_.param,
        LayerSwaps{options.fast_layers && device_ < 0, !options.exact, options.relu_rule,
                   !options.exact && options.bf16_backward, !options.exact && options.bf16_forward,
                   options.layer_rules, options.deeplift});
  }
  check_weights_fit(*net_, user_net);
  {
    QuietGlog quiet;  // Caffe logs every layer of the user's net the internal one leaves out
    net_->ShareTrainedLayersWith(&user_net);
  }
  for (int l = 0; l < static_cast<int>(net_->layers().size()); ++l)
    if (!net_->layers()[l]->blobs().empty())
      shared_layers_.emplace_back(l, layer_index(user_net, net_->layer_names()[l]));
  // force_backward turned on every weight gradient; saliency needs only the data gradients.
  for (const auto& layer : net_->layers())
    for (int i = 0; i < static_cast<int>(layer->blobs().size()); ++i)
      layer->set_param_propagate_down(i, false);
  input_ = net_->blob_by_name(plan_.input_blob).get();
  score_ = net_->blob_by_name(plan_.score_blob).get();
  score_layer_ = layer_index(*net_, plan_.score_layer);
  if (score_->num_axes() < 1 || score_->shape(0) != 1)
    throw std::invalid_argument("score blob '" + plan_.score_blob + "' has shape " + score_->shape_string() +
                                " for one image: its first axis is not the batch axis");
  num_classes_ = score_->count(1);
  gradient_ = net_->blob_by_name(plan_.gradient_blob).get();
  stop_layer_ = plan_.gradient_layer.empty() ? 0 : layer_index(*net_, plan_.gradient_layer) + 1;
  if (gradient_->num_axes() < 2 || gradient_->shape(0) != 1)
    throw std::invalid_argument("blob '" + plan_.gradient_blob + "' has shape " + gradient_->shape_string() +
                                " for one image; attributions need (N, C, ...) with N the batch axis");
  gradient_shape_.assign(gradient_->shape().begin() + 1, gradient_->shape().end());
  if (options.fast_layers && device_ < 0) {
    net_->fold_batch_norm(stop_layer_, score_layer_);
    if (forward_only_ && !options.exact) net_->fuse_relus(score_layer_);  // no backward: no masks
    if (!options.exact && options.blocked_layouts)              // the exact forward is Caffe's, on NCHW
      net_->keep_blocked_layouts({input_, score_, gradient_});  // the blobs the engine reads and writes
    if (!forward_only_ && options.layer_rules.empty() && !deeplift_) {  // the head's products: the gradient's
      head_ = std::make_unique<ClassHead>(*net_, score_layer_, stop_layer_, options.relu_rule);
      head_bytes_ = options.memory_budget / 4;
      if (head_->empty()) head_.reset();
    }
  }
  bytes_per_image_ = fastsal::bytes_per_image(*net_, options.fast_layers && device_ < 0, !forward_only_) +
                     net_->workspace_bytes_per_image();
  batch_size_ = choose_batch_size(options, bytes_per_image_);
}

SaliencyEngine::~SaliencyEngine() = default;

bool SaliencyEngine::matches(const caffe::Net<float>& user_net) const {
  if (!user_net.has_blob(plan_.input_blob)) return false;
  const auto& shape = user_net.blob_by_name(plan_.input_blob)->shape();
  if (shape.size() != plan_.user_image_shape.size() + 1 ||
      !std::equal(plan_.user_image_shape.begin(), plan_.user_image_shape.end(), shape.begin() + 1))
    return false;
  const int user_layers = static_cast<int>(user_net.layers().size());
  for (const auto& [mine, theirs] : shared_layers_) {
    if (theirs >= user_layers) return false;
    const auto& own = net_->layers()[mine]->blobs();
    const auto& users = user_net.layers()[theirs]->blobs();
    if (own.size() != users.size()) return false;
    for (std::size_t j = 0; j < own.size(); ++j)
      if (own[j]->data() != users[j]->data()) return false;  // the engine holds its memory: no reuse
  }
  return true;
}

std::size_t SaliencyEngine::image_size() const {
  return std::accumulate(plan_.image_shape.begin(), plan_.image_shape.end(), std::size_t(1),
                         std::multiplies<std::size_t>());
}

std::size_t SaliencyEngine::gradient_size() const {
  return std::accumulate(gradient_shape_.begin(), gradient_shape_.end(), std::size_t(1),
                         std::multiplies<std::size_t>());
}

std::size_t SaliencyEngine::map_size() const { return gradient_size() / gradient_shape_[0]; }

void SaliencyEngine::check_request(const SaliencyRequest& request) const {
  if (request.num_images < 0 || request.classes_per_image < 1 || request.samples < 1)
    throw std::invalid_argument("need at least one class and one sample per image");
  if (!request.classes && (request.classes_per_image > num_classes_ || request.samples != 1))
    throw std::invalid_argument("top_k=" + std::to_string(request.classes_per_image) + " exceeds the " +
                                std::to_string(num_classes_) + " classes of score blob '" + plan_.score_blob +
                                "', or several samples per image: rank the classes first");
  if (request.objective == Objective::kGuide &&
      (!request.guide || request.guide_columns < 1 || score_->num_axes() < 2))
    throw std::invalid_argument("a guide needs its (C, M) features and a score blob with channels");
  if (deeplift_ != (request.baselines != nullptr) || (request.baselines && request.samples != 1))
    throw std::invalid_argument(deeplift_ ? "DeepLIFT needs baselines, one per image (one sample each)"
                                          : "baselines are for an engine built for DeepLIFT");
  if ((request.activations || request.scores) && request.samples != 1)
    throw std::invalid_argument("activations and scores are returned for one sample per image only");
  if (!request.classes) return;
  const std::size_t n = std::size_t(request.num_images) * request.classes_per_image;
  for (std::size_t i = 0; i < n; ++i)
    if (request.classes[i] < 0 || request.classes[i] >= num_classes_)
      throw std::invalid_argument("class " + std::to_string(request.classes[i]) + " is out of range [0, " +
                                  std::to_string(num_classes_) + ")");
}

void SaliencyEngine::compute(const SaliencyRequest& request) {
  if (forward_only_) throw std::logic_error("this engine was built for forward passes only");
  run(request, nullptr);
}

void SaliencyEngine::reload_weights() {
  std::lock_guard<std::mutex> lock(mutex_);  // not while a call runs the net
  net_->reload_weights();
}

std::vector<LayerTime> SaliencyEngine::profile_layers(const SaliencyRequest& request) {
  std::vector<LayerTime> times;
  run(request, &times);
  return times;
}

void SaliencyEngine::run(const SaliencyRequest& request, std::vector<LayerTime>* times) {
  check_request(request);
  std::lock_guard<std::mutex> lock(mutex_);  // one internal net: one call at a time
  ThreadCountScope team(threads_);
  CaffeModeScope mode(device_);
#ifdef FASTSAL_WITH_CUDA
  if (device_ >= 0) check_weights_on_device(*net_, device_);
#endif
  if (times) {
    times->resize(score_layer_ + 1);
    for (int l = 0; l <= score_layer_; ++l) (*times)[l] = {net_->layer_names()[l], net_->layers()[l]->type()};
  }
  BatchPlan batches =
      plan_batches(layout_, device_ >= 0, request.num_images, request.classes_per_image, batch_size_);
  batches.pairs =
      batches.pairs && request.samples == 1 && !request.baselines;  // samples fill the batch already
  // Several samples, weights or a multiplier: accumulate per (image, class), then finish. Otherwise each
  // backward's gradient is reduced straight into its slot of the output.
  const bool direct = request.samples == 1 && !request.sample_weights && !request.multiplier &&
                      request.accumulate == Accumulate::kSum && !request.accumulator;
  std::vector<float> own;
  float* accumulator = request.accumulator;
  if (!direct && !accumulator) {
    own.assign(std::size_t(request.num_images) * request.classes_per_image * gradient_size() *
                   (request.accumulate == Accumulate::kVariance ? 2 : 1),
               0.f);
    accumulator = own.data();
  }
  const std::int64_t units =
      std::int64_t(request.num_images) * (batches.pairs ? request.classes_per_image : request.samples);
  const int rows = balanced_rows(units, batches.rows_per_pass);
  for (std::int64_t first = 0; first < units; first += rows)
    run_batch(request, first, static_cast<int>(std::min<std::int64_t>(rows, units - first)), batches.pairs,
              direct ? nullptr : accumulator, times);
  if (!direct && request.finish) finish(request, accumulator);
}

void SaliencyEngine::forward_scores(const ForwardRequest& request) {
  if (request.num_rows < 0) throw std::invalid_argument("num_rows must be >= 0");
  if (request.from_layer && request.activations)
    throw std::invalid_argument("activations come from a forward from the input, not from_layer");
  if (request.from_layer && plan_.gradient_layer.empty())
    throw std::invalid_argument("from_layer needs a layer blob between the input and the score");
  if (request.from_layer) check_forward_from_layer();
  std::lock_guard<std::mutex> lock(mutex_);
  ThreadCountScope team(threads_);
  CaffeModeScope mode(device_);
#ifdef FASTSAL_WITH_CUDA
  if (device_ >= 0) check_weights_on_device(*net_, device_);
#endif
  const std::size_t row_floats = request.from_layer ? gradient_size() : image_size();
  for (std::int64_t first = 0; first < request.num_rows; first += batch_size_) {
    const int rows = static_cast<int>(std::min<std::int64_t>(batch_size_, request.num_rows - first));
    if (request.from_layer) {
      forward_from_layer(request.rows + first * row_floats, rows, request.first_index + first);
    } else {
      const auto row = [first](int r) -> std::int64_t { return first + r; };
      forward(request.rows, rows, row, row, request.first_index, nullptr);
    }
    std::copy_n(score_->cpu_data(), std::size_t(rows) * num_classes_, request.scores + first * num_classes_);
    if (request.activations)
      std::copy_n(gradient_->cpu_data(), std::size_t(rows) * gradient_size(),
                  request.activations + first * gradient_size());
  }
}

void SaliencyEngine::check_forward_from_layer() const {
  // Layers above the layer blob that read anything computed below it (a residual branch's other input)
  // would read the previous batch's values.
  std::vector<bool> fresh(net_->blobs().size(), false);
  fresh[find_blob(*net_, plan_.gradient_blob, "layer")] = true;
  for (int l = stop_layer_; l <= score_layer_; ++l) {
    for (int id : net_->bottom_ids(l))
      if (!fresh[id])
        throw std::invalid_argument("layer '" + net_->layer_names()[l] + "' above layer blob '" +
                                    plan_.gradient_blob + "' also reads blob '" + net_->blob_names()[id] +
                                    "', which is computed below it; choose a layer blob that every later "
                                    "layer's input depends on alone (a block's output)");
    for (int id : net_->top_ids(l)) fresh[id] = true;
  }
}

void SaliencyEngine::forward_from_layer(const float* values, int rows, std::int64_t first_index) {
  std::vector<int> shape = {rows};
  shape.insert(shape.end(), plan_.image_shape.begin(), plan_.image_shape.end());
  input_->Reshape(shape);
  net_->Reshape();  // every blob at `rows`; only the layers above the layer blob then run
  std::copy_n(values, std::size_t(rows) * gradient_size(), gradient_->mutable_cpu_data());
  net_->ForwardFromTo(stop_layer_, score_layer_);
  const auto row = [](int r) -> std::int64_t { return r; };
  check_forward(rows, row, first_index, true);
}

void SaliencyEngine::forward(const float* images, int rows,
                             const std::function<std::int64_t(int)>& source_row,
                             const std::function<std::int64_t(int)>& image_of, std::int64_t first_index,
                             std::vector<LayerTime>* times, const char* what) {
  const std::size_t image_floats = image_size();
  std::vector<int> shape = {rows};
  shape.insert(shape.end(), plan_.image_shape.begin(), plan_.image_shape.end());
  input_->Reshape(shape);
  float* input = input_->mutable_cpu_data();  // on a GPU, Caffe uploads it at the first layer
  for (int r = 0; r < rows; ++r)
    std::copy_n(images + source_row(r) * image_floats, image_floats, input + r * image_floats);
  if (times) {
    for (int l = 0; l <= score_layer_; ++l) {
      const auto start = Clock::now();
      net_->ForwardFromTo(l, l);
      (*times)[l].forward_seconds += seconds_since(start);
    }
  } else {
    net_->ForwardFromTo(0, score_layer_);
  }
  check_forward(rows, image_of, first_index, false, what);
}

void SaliencyEngine::check_forward(int rows, const std::function<std::int64_t(int)>& image_of,
                                   std::int64_t first_index, bool from_layer, const char* what) const {
  std::string where;
  int bad = from_layer ? -1 : net_->first_overflowed_row(score_layer_, &where);
  const float* scores = score_->cpu_data();  // on a GPU: rows x num_classes floats, a small copy
  for (int r = 0; r < (bad < 0 ? rows : bad); ++r)
    if (!std::all_of(scores + std::size_t(r) * num_classes_, scores + std::size_t(r + 1) * num_classes_,
                     [](float s) { return std::isfinite(s); })) {
      bad = r;
      where = "score blob '" + plan_.score_blob + "'";
      break;
    }
  if (bad >= 0)
    throw std::domain_error(what + ("[" + std::to_string(first_index + image_of(bad))) +
                            "] overflows float32 inside the net: Inf or NaN reached " + where +
                            ", so its saliency is undefined; scale the image to the range the net was "
                            "trained on");
}

void SaliencyEngine::run_batch(const SaliencyRequest& request, std::int64_t first, int rows, bool pairs,
                               float* accumulator, std::vector<LayerTime>* times) {
  const int k_count = request.classes_per_image, samples = request.samples;
  const std::size_t g_floats = gradient_size(), map_floats = map_size();
  const bool gpu = device_ >= 0;
  // Row r holds unit first + r: a row of request.images (image n's samples are rows n*S .. n*S+S-1),
  // or with pairs the (n, k) pair first + r, in (n, k) order.
  const auto image_of = [&](int r) -> std::int64_t { return (first + r) / (pairs ? k_count : samples); };
  const auto source_row = [&](int r) -> std::int64_t { return pairs ? image_of(r) : first + r; };
  if (request.baselines) {  // DeepLIFT: the references' forward, then the images'; the K backwards share both
    struct PlainAfter {     // a refused forward leaves the layers keeping nothing
      SaliencyNet& net;
      ~PlainAfter() { net.set_deeplift_pass(layers::DeepLiftPass::kPlain); }
    } plain_after{*net_};
    net_->set_deeplift_pass(layers::DeepLiftPass::kReference);
    forward(request.baselines, rows, source_row, image_of, request.first_index, times, "baselines");
    net_->set_deeplift_pass(layers::DeepLiftPass::kInput);
    forward(request.images, rows, source_row, image_of, request.first_index, times);
  } else {
    forward(request.images, rows, source_row, image_of, request.first_index, times);
  }
  // Rows that start an image (every row, unless pairs): its ranking and its activations come from there.
  const auto starts_image = [&](int r) { return !pairs || (first + r) % k_count == 0; };

  // A blob's values per image, from the row that starts it, into (num_images, floats) at out.
  const auto copy_per_image = [&](const caffe::Blob<float>& blob, std::size_t floats, float* out) {
    const float* values = blob.cpu_data();
    for (int r = 0; r < rows; ++r)
      if (starts_image(r)) std::copy_n(values + r * floats, floats, out + image_of(r) * floats);
  };
  if (request.scores) copy_per_image(*score_, num_classes_, request.scores);
  if (request.activations) copy_per_image(*gradient_, g_floats, request.activations);
  // Without given classes, each image's top K (ties: lower id first), ranked once, from the row that
  // holds its first pair (every row, per class); later rows of the image read the ranking written then.
  if (!request.classes) {
    const float* scores = score_->cpu_data();
    std::vector<int> order(num_classes_);
    for (int r = 0; r < rows; ++r) {
      if (!starts_image(r)) continue;
      const float* s = scores + std::size_t(r) * num_classes_;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + k_count, order.end(),
                        [s](int a, int b) { return s[a] > s[b] || (s[a] == s[b] && a < b); });
      std::copy_n(order.begin(), k_count, request.top_classes + image_of(r) * k_count);
    }
  }
  const int* classes = request.classes ? request.classes : request.top_classes;

  // With pairs, one backward seeds every row with its own class, and row r's slot is first + r.
  // Otherwise pass k seeds class k of each row's image, and row r's slot is (its image, k).
  const int passes = pairs ? 1 : k_count;
  const auto slot_of = [&](int r, int pass) -> std::size_t {
    return pairs ? std::size_t(first + r) : std::size_t(image_of(r)) * k_count + pass;
  };
  // Seeds: row r's class is row_classes[r * stride + pass].
  std::vector<int> row_classes(pairs ? rows : std::size_t(rows) * k_count);
  for (int r = 0; r < rows; ++r)
    for (int pass = 0; pass < passes; ++pass)
      row_classes[std::size_t(r) * passes + pass] = classes[slot_of(r, pass)];
  const int* seeds = row_classes.data();
  // The direct path's reduction writes row r of pass k at out + slot_of(r, k) * map_floats, which is
  // out0 + r * stride: consecutive slots with pairs, every K-th otherwise (images are the rows then).
  const bool direct = accumulator == nullptr;
  const bool reduce_here = direct && request.reduce != Reduce::kNone;
  const ChannelReduction op =
      request.reduce == Reduce::kSum ? ChannelReduction::kSum : ChannelReduction::kAbsMax;
  const ChannelLayout layout{rows, gradient_shape_[0], static_cast<int>(map_floats),
                             static_cast<std::ptrdiff_t>(passes * map_floats)};
  float* out0 = request.out + slot_of(0, 0) * map_floats;
#ifdef FASTSAL_WITH_CUDA
  float* device_maps = nullptr;
  if (gpu) {
    device_buffers_->reserve(row_classes.size(), reduce_here ? row_classes.size() * map_floats : 0);
    check_cuda_call(
        cudaMemcpy(device_buffers_->classes, seeds, row_classes.size() * sizeof(int), cudaMemcpyHostToDevice),
        "copying the classes to the device");
    seeds = device_buffers_->classes;
    device_maps = device_buffers_->maps;
  }
#endif
  // Per class, the head's backward (class_head.hpp) is one GEMM per layer for a chunk of classes; the
  // backward below it then starts from the head's share of the diff.
  const bool use_head = head_ && !gpu && !pairs && passes > 1 && request.objective == Objective::kClassScore;
  const int head_chunk = use_head ? head_->passes_within(rows, head_bytes_) : 0;
  const float* head_diffs = nullptr;
  int chunk_first = 0, chunk = 0;
  std::vector<double> head_seconds(times ? score_layer_ + 1 : 0, 0.);
  const int from_layer = use_head ? head_->first_layer() - 1 : score_layer_;
  for (int pass = 0; pass < passes; ++pass) {
    // Backward overwrites bottom diffs, so one forward serves every pass (in-place layers may have
    // written the score's diff, so it is re-seeded each time).
    if (use_head) {
      if (pass >= chunk_first + chunk) {
        chunk_first = pass, chunk = std::min(head_chunk, passes - pass);
        head_diffs = head_->backward(rows, seeds, passes, pass, chunk, times ? &head_seconds : nullptr);
      }
      const std::size_t floats = head_->bottom()->count();
      std::copy_n(head_diffs + (pass - chunk_first) * floats, floats, head_->bottom()->mutable_cpu_diff());
    } else if (gpu && request.objective == Objective::kClassScore) {
#ifdef FASTSAL_WITH_CUDA
      seed_one_hot_gpu(score_->mutable_gpu_diff(), rows, num_classes_, seeds, passes, pass);
#endif
    } else if (request.objective != Objective::kClassScore) {
      seed_objective(request, rows);  // on a GPU through host copies of the score blob: dream's small case
    } else {
      float* seed = score_->mutable_cpu_diff();
      caffe::caffe_set(score_->count(), 0.f, seed);
      for (int r = 0; r < rows; ++r) seed[seed_index(r, seeds, num_classes_, passes, pass)] = 1.f;
    }
    if (times) {
      for (int l = from_layer; l >= stop_layer_; --l) {
        const auto start = Clock::now();
        net_->BackwardFromTo(l, l);
        (*times)[l].backward_seconds += seconds_since(start);
      }
    } else {
      net_->BackwardFromTo(from_layer, stop_layer_);
    }

    if (reduce_here) {
      if (gpu) {
#ifdef FASTSAL_WITH_CUDA
        channel_reduce_gpu(gradient_->gpu_diff(), layout, op, device_maps + pass * map_floats);
#endif
      } else {
        channel_reduce_cpu(gradient_->cpu_diff(), layout, op, out0 + pass * map_floats);
      }
      continue;
    }
    const float* gradient = gradient_->cpu_diff();  // on a GPU this copies it to the host
    if (direct) {                                   // the raw gradient
      for (int r = 0; r < rows; ++r)
        std::copy_n(gradient + r * g_floats, g_floats, request.out + slot_of(r, pass) * g_floats);
      continue;
    }
    const std::size_t second =
        std::size_t(request.num_images) * k_count * g_floats;  // the squares, for kVariance
    for (int r = 0; r < rows; ++r) {
      const float w = request.sample_weights ? request.sample_weights[(first + r) % samples] : 1.f;
      const float* g = gradient + r * g_floats;
      float* sum = accumulator + slot_of(r, pass) * g_floats;
      const std::int64_t n = static_cast<std::int64_t>(g_floats);
      if (request.accumulate != Accumulate::kSquares) {
#pragma omp parallel for simd schedule(static) if (n >= (1 << 17))
        for (std::int64_t i = 0; i < n; ++i) sum[i] += w * g[i];
      }
      if (request.accumulate != Accumulate::kSum) {
        float* squares = request.accumulate == Accumulate::kSquares ? sum : sum + second;
#pragma omp parallel for simd schedule(static) if (n >= (1 << 17))
        for (std::int64_t i = 0; i < n; ++i) squares[i] += w * g[i] * g[i];
      }
    }
  }
  for (std::size_t l = 0; l < head_seconds.size(); ++l) (*times)[l].backward_seconds += head_seconds[l];
#ifdef FASTSAL_WITH_CUDA
  if (gpu && reduce_here) {  // only the maps cross to the host: one transfer per batch, through pinned memory
    const std::size_t floats = row_classes.size() * map_floats;
    check_cuda_call(cudaMemcpyAsync(device_buffers_->pinned_maps, device_maps, floats * sizeof(float),
                                    cudaMemcpyDeviceToHost, 0),
                    "copying the maps to the host");
    check_cuda_call(cudaStreamSynchronize(0), "waiting for the maps");
    std::copy_n(device_buffers_->pinned_maps, floats, out0);
  }
#endif
}

void SaliencyEngine::seed_objective(const SaliencyRequest& request, int rows) {
  const float* data = score_->cpu_data();
  float* diff = score_->mutable_cpu_diff();
  if (request.objective == Objective::kL2) {
    std::copy_n(data, score_->count(), diff);
    return;
  }
  // kGuide: for each position j of each row, the guide column m maximising <a[:, j], guide[:, m]>.
  const int channels = score_->shape(1);
  const std::int64_t positions = score_->count(2), m_count = request.guide_columns;
  for (int r = 0; r < rows; ++r) {
    const float* a = data + std::size_t(r) * channels * positions;
    float* d = diff + std::size_t(r) * channels * positions;
#pragma omp parallel for schedule(static) if (positions * m_count * channels >= (1 << 18))
    for (std::int64_t j = 0; j < positions; ++j) {
      std::int64_t best = 0;
      float best_dot = -INFINITY;
      for (std::int64_t m = 0; m < m_count; ++m) {
        float dot = 0.f;
        for (int c = 0; c < channels; ++c) dot += a[c * positions + j] * request.guide[c * m_count + m];
        if (dot > best_dot) best_dot = dot, best = m;
      }
      for (int c = 0; c < channels; ++c) d[c * positions + j] = request.guide[c * m_count + best];
    }
  }
}

void SaliencyEngine::finish(const SaliencyRequest& request, const float* accumulator) const {
  const std::size_t g_floats = gradient_size(), map_floats = map_size();
  const std::int64_t slots = std::int64_t(request.num_images) * request.classes_per_image;
  const std::size_t second = std::size_t(slots) * g_floats;
  const ChannelLayout layout{1, gradient_shape_[0], static_cast<int>(map_floats), 0};
  const ChannelReduction op =
      request.reduce == Reduce::kSum ? ChannelReduction::kSum : ChannelReduction::kAbsMax;
#pragma omp parallel for schedule(dynamic)
  for (std::int64_t slot = 0; slot < slots; ++slot) {
    std::vector<float> value(accumulator + slot * g_floats, accumulator + (slot + 1) * g_floats);
    if (request.accumulate == Accumulate::kVariance)  // E[g^2] - E[g]^2, with the weights 1/S
      for (std::size_t i = 0; i < g_floats; ++i)
        value[i] = accumulator[second + slot * g_floats + i] - value[i] * value[i];
    if (request.multiplier) {
      const float* m = request.multiplier + (slot / request.classes_per_image) * g_floats;
      for (std::size_t i = 0; i < g_floats; ++i) value[i] *= m[i];
    }
    if (request.reduce == Reduce::kNone) {
      std::copy(value.begin(), value.end(), request.out + slot * g_floats);
    } else {
      for (std::size_t p = 0; p < map_floats; ++p)
        request.out[slot * map_floats + p] = channel_reduce_at(value.data(), layout, op, p);
    }
  }
}

}  // namespace fastsal
