// The saliency engine: a force_backward copy of the user's net that shares its weights, runs one forward
// per batch of images and one data-only backward per class, and reduces the input gradient to maps.
// It knows nothing of Python: it takes a caffe::Net, pointers and sizes, and writes into caller buffers.
#pragma once

#include <caffe/net.hpp>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "class_head.hpp"
#include "net_surgery.hpp"
#include "saliency_net.hpp"

namespace fastsal {

// How one call's (image, class) pairs go through the net.
enum class BatchLayout {
  kAuto,      // kPerClass on the CPU; kPairs on a GPU when the images alone leave the batch under-filled
  kPerClass,  // one forward per batch of images, then one backward per class
  kPairs,     // each image repeated K times in the batch, a genuine forward at that size, one backward
};

struct BatchPlan {
  bool pairs;         // the batch carries (image, class) pairs, in (n, k) order; else images
  int rows_per_pass;  // batch rows per forward pass: never more than batch_size, whatever K is
};

// A CPU pass costs about the same per image at any batch size, so repeating an image K times costs K
// forwards: one forward and K backwards is cheaper (about (1 + K) F against 2 K F). A GPU pass costs
// about the same until the batch fills the device (batch_size is that size): with fewer images than
// that, ceil(N K / B) full passes beat one forward plus K under-filled backwards. Replicating
// activations instead of forwarding would be wrong for MaxPool, LRN, BatchNorm, PReLU, Eltwise MAX.
// Pairs run in (n, k) order, B per pass: an image's classes may span passes, and a pass may hold
// several images.
BatchPlan plan_batches(BatchLayout layout, bool on_gpu, int num_images, int classes_per_image,
                       int batch_size);

// Rows per pass for `units` rows, at most `cap` a pass: as few passes as the cap allows, each as short
// as that allows (8 rows at cap 7: 4 + 4, not 7 + 1). A short last pass runs below the batch's
// efficiency and re-plans every oneDNN primitive for its shape (VGG-16, 8 images: 7 + 1 ~10% slower).
int balanced_rows(std::int64_t units, int cap);

struct EngineOptions {
  std::string input_blob;        // empty: the net's first input
  std::string score_blob;        // empty: the input of the net's one Softmax output, else its only output
  std::string gradient_blob;     // empty: the input blob; else a blob between input and score (Grad-CAM)
  std::vector<int> image_shape;  // empty: the input blob's (C, H, W); else this size (dream's octaves)
  int batch_size = 0;            // rows per forward pass; 0: as many as fit memory_budget, at most 16
  bool fast_layers = true;       // fastsal's faster CPU layers (cpp/layers/); false: Caffe's own code only
  bool exact =
      true;  // false (with fast_layers): the forward's convolutions through oneDNN too, not bit for bit
  ReLURule relu_rule = ReLURule::kGradient;  // guided backprop and deconvnet replace plain ReLUs' backward
  bool bf16_backward = true;    // inexact only, on CPUs with AMX: the convolutions' data backward in bf16
  bool bf16_forward = false;    // inexact only, on CPUs with AMX: the convolutions' forward in bf16 (scores)
  bool blocked_layouts = true;  // inexact only: oneDNN's layout kept between its convolutions (same values)
  std::vector<std::pair<std::string, layers::Rule>> layer_rules;  // LRP: per-layer rules (SaliencyNet's)
  bool deeplift = false;  // DeepLIFT's Rescale rule (SaliencyNet's); compute() then needs baselines
  int device = -1;        // -1: CPU; else the CUDA device (a CUDA build of Caffe and fastsal)
  BatchLayout layout = BatchLayout::kAuto;
  std::size_t memory_budget = std::size_t(1) << 30;  // bytes of blobs and layer state per batch
  int threads = 0;  // OpenMP threads for this engine's work (oneDNN's too); 0: OpenMP's default
  // Forward passes only (perturbation methods, metrics): no force_backward, so Caffe never allocates a
  // diff, and the batch is sized by the blobs' data alone. compute() then refuses.
  bool forward_only = false;
};

// How an image's samples combine (noise samples, integration steps), per (image, class), before the
// multiplier and the channel reduction: sum_s w_s g_s, sum_s w_s g_s^2, or their difference
// sum_s w_s g_s^2 - (sum_s w_s g_s)^2 (with weights 1/S: the biased variance).
enum class Accumulate { kSum, kSquares, kVariance };
enum class Reduce { kAbsMax, kSum, kNone };  // over the gradient blob's channels; kNone: the raw values

// What the backward differentiates: the class score (a one-hot seed), or deep dream's objectives at the
// score blob: 0.5 ||a||^2 (seed a), or the guide's (each position of a seeded with the guide feature
// vector that has the largest dot product with it, as Google's deepdream notebook does).
enum class Objective { kClassScore, kL2, kGuide };

// One call's buffers, all C-contiguous, sizes checked by the caller. G is the gradient blob's shape for
// one image (the image shape by default), g its element count.
struct SaliencyRequest {
  const float* images = nullptr;  // (num_images * samples, *image_shape): image n's samples at n*S .. n*S+S-1
  int num_images = 0;
  int samples = 1;                        // S rows per image
  const float* sample_weights = nullptr;  // (S,) the w_s; null: every w_s = 1
  Accumulate accumulate = Accumulate::kSum;
  const float* multiplier = nullptr;  // optional (num_images, *G): the combined gradient times this
  // DeepLIFT (and only there): (num_images, *image_shape) references, each batch's forwarded before its
  // images; the backwards then follow the Rescale rule between the two (samples == 1).
  const float* baselines = nullptr;
  Reduce reduce = Reduce::kAbsMax;
  std::int64_t first_index = 0;  // index of images[0] in the caller's whole array, for error messages
  Objective objective = Objective::kClassScore;
  const float* guide = nullptr;  // kGuide: (C, M) features, C the score blob's channels
  int guide_columns = 0;         // M
  int classes_per_image = 0;     // K
  const int* classes = nullptr;  // (num_images, K); null: take each image's top-K scores (samples == 1)
  int* top_classes = nullptr;    // (num_images, K), written when classes is null
  float* out = nullptr;          // (num_images, K, H, W), or (num_images, K, *G) with Reduce::kNone
  // Optional, the caller's zeroed (num_images, K, *G) sums (twice that for kVariance), kept across calls
  // so that an image's samples can come in several calls of at most a batch each: each call adds its
  // samples; the one with finish set also writes out.
  float* accumulator = nullptr;
  bool finish = true;
  float* activations = nullptr;  // optional (num_images, *G): the gradient blob's values (samples == 1)
  float* scores = nullptr;       // optional (num_images, num_classes): the score blob's values (samples == 1)
};

// Forward passes only: the one path of every method and metric that needs scores, not gradients. Rows
// are images, or with from_layer the layer blob's values (the gradient blob, G per row): the forward
// then starts after the last layer that writes that blob, so the layers below it do not run.
struct ForwardRequest {
  const float* rows = nullptr;  // (num_rows, *image_shape), or (num_rows, *G) with from_layer
  int num_rows = 0;
  bool from_layer = false;
  std::int64_t first_index = 0;  // index of rows[0] in the caller's whole array, for error messages
  float* scores = nullptr;       // (num_rows, num_classes): the score blob's values
  float* activations = nullptr;  // optional (num_rows, *G): the layer blob's values (not with from_layer)
};

// Seconds Caffe spent in one layer, summed over a call: the engine's floor.
struct LayerTime {
  std::string name, type;
  double forward_seconds = 0, backward_seconds = 0;
};

class SaliencyEngine {
 public:
  // Reads the user's net once; afterwards only its weight memory is shared, so the engine stays valid
  // even if the user's net is destroyed.
  SaliencyEngine(const caffe::Net<float>& user_net, const EngineOptions& options);
  ~SaliencyEngine();

  // Validates the request, then streams its rows through batches. Thread-safe: calls are serialised.
  // An image whose activations overflow float32 (Inf or NaN reach a max pooling or the scores) is
  // refused with std::domain_error naming it; the maps of earlier batches are then already written.
  void compute(const SaliencyRequest& request);

  // Whether this engine still describes `user_net`: its input blob has the same image shape and its
  // layers still hold the weight memory the engine shares (share_with() replaces it). Call with the
  // user's net alive and not running.
  bool matches(const caffe::Net<float>& user_net) const;

  // The user's weights were written in place (same memory, new values): rebuild what was computed from
  // them (SaliencyNet::reload_weights), so the next call's maps are a freshly built engine's.
  void reload_weights();

  // The same work as compute(), timing every layer call (for the benchmarks).
  std::vector<LayerTime> profile_layers(const SaliencyRequest& request);

  // Streams the request's rows through forward passes of at most batch_size rows. A row whose forward
  // overflows float32 is refused with std::domain_error, as in compute(); a from_layer request on a net
  // where a layer above the layer blob also reads a blob computed below it, with std::invalid_argument.
  void forward_scores(const ForwardRequest& request);

  const std::string& input_blob() const { return plan_.input_blob; }
  const std::string& score_blob() const { return plan_.score_blob; }
  const std::vector<int>& image_shape() const { return plan_.image_shape; }
  const std::string& gradient_blob() const { return plan_.gradient_blob; }
  std::vector<int> score_shape() const {  // one image's
    return {score_->shape().begin() + 1, score_->shape().end()};
  }
  const std::vector<int>& gradient_shape() const { return gradient_shape_; }  // G: one image's
  int num_classes() const { return num_classes_; }
  std::size_t bytes_per_image() const { return bytes_per_image_; }
  const std::vector<std::string>& score_rewrites() const { return plan_.score_rewrites; }
  int batch_size() const { return batch_size_; }
  // The internal net's blobs held in oneDNN's blocked layout (SaliencyNet::keep_blocked_layouts).
  const std::vector<std::string>& blocked_blobs() const { return net_->blocked_blobs(); }
  const std::vector<std::string>& fused_relus() const { return net_->fused_relus(); }
  // The lowest layer of the class head (class_head.hpp) whose backward runs once for all classes; empty
  // when there is none.
  std::string head_layer() const { return head_ ? net_->layer_names()[head_->first_layer()] : std::string(); }
  int device() const { return device_; }
  int threads() const { return threads_; }
  std::size_t image_size() const;     // floats per input image
  std::size_t gradient_size() const;  // floats per image of the gradient blob
  std::size_t map_size() const;       // floats per map: the gradient blob's pixels

 private:
  struct DeviceBuffers;  // the GPU's seeds and maps, and a pinned host copy of the maps
  void check_request(const SaliencyRequest& request) const;
  void run(const SaliencyRequest& request, std::vector<LayerTime>* times);
  // Copies rows [first, first + rows) into the input blob (row_image maps a row to its image row in
  // request.images) and runs the forward pass, checking it for overflow; `what` names the rows in its
  // error ("images", or DeepLIFT's "baselines").
  void forward(const float* images, int rows, const std::function<std::int64_t(int)>& source_row,
               const std::function<std::int64_t(int)>& image_of, std::int64_t first_index,
               std::vector<LayerTime>* times, const char* what = "images");
  // One forward of `rows` batch rows starting at unit `first` (a row of request.images, or with pairs an
  // (n, k) pair index), then the backward passes of their classes.
  void run_batch(const SaliencyRequest& request, std::int64_t first, int rows, bool pairs, float* accumulator,
                 std::vector<LayerTime>* times);
  // Writes dream's seed (objective kL2 or kGuide) into the score blob's diff, from its data.
  void seed_objective(const SaliencyRequest& request, int rows);
  // After every sample was accumulated: variance, multiplier, channel reduction, into request.out.
  void finish(const SaliencyRequest& request, const float* accumulator) const;
  // Copies `rows` rows of the layer blob's values into it and runs the layers above it.
  void forward_from_layer(const float* values, int rows, std::int64_t first_index);
  void check_forward_from_layer() const;
  // Throws std::domain_error naming the first image whose forward pass overflowed float32; with
  // from_layer, only the layers above the layer blob ran, so only the scores are checked.
  void check_forward(int rows, const std::function<std::int64_t(int)>& image_of, std::int64_t first_index,
                     bool from_layer = false, const char* what = "images") const;

  SaliencyNetPlan plan_;
  int num_classes_ = 0;
  std::size_t bytes_per_image_ = 0;
  int batch_size_;
  int device_;
  int threads_;
  BatchLayout layout_;
  std::unique_ptr<DeviceBuffers> device_buffers_;
  std::unique_ptr<SaliencyNet> net_;
  std::unique_ptr<ClassHead> head_;  // null: none, or on a GPU
  std::size_t head_bytes_ = 0;       // for the head's diffs of a chunk of classes
  caffe::Blob<float>* input_;
  caffe::Blob<float>* score_;
  int score_layer_;
  caffe::Blob<float>* gradient_;  // the blob whose diff is the attribution
  int stop_layer_;                // the backward runs down to this layer; a from_layer forward starts here
  bool forward_only_;
  bool deeplift_;
  std::vector<int> gradient_shape_;
  std::vector<std::pair<int, int>> shared_layers_;  // (internal, user) indices of layers sharing weights
  mutable std::mutex mutex_;
};

}  // namespace fastsal
