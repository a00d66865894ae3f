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

#include "fast_layers.hpp"
#include "net_surgery.hpp"

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

struct EngineOptions {
  std::string input_blob;   // empty: the net's first input
  std::string score_blob;   // empty: the bottom of a final Softmax, else the net's only output
  int batch_size = 0;       // images per forward pass; 0: as many as fit memory_budget, at most 16
  bool fast_layers = true;  // fastsal's faster CPU layers (fast_layers.hpp); false: Caffe's own code only
  int device = -1;          // -1: CPU; else the CUDA device (a CUDA build of Caffe and fastsal)
  BatchLayout layout = BatchLayout::kAuto;
  std::size_t memory_budget = std::size_t(1) << 30;  // bytes of blobs and layer state per batch
};

// One call's buffers, all C-contiguous, sizes checked by the caller.
struct SaliencyRequest {
  const float* images = nullptr;  // (num_images, *image_shape)
  int num_images = 0;
  std::int64_t first_index = 0;  // index of images[0] in the caller's whole array, for error messages
  int classes_per_image = 0;     // K
  const int* classes = nullptr;  // (num_images, K); null: take each image's top-K scores
  int* top_classes = nullptr;    // (num_images, K), written when classes is null
  float* maps = nullptr;         // (num_images, K, H, W)
  float* gradients = nullptr;    // optional (num_images, K, *image_shape)
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

  // Validates class ids, then streams the images through batches. Thread-safe: calls are serialised.
  // An image whose activations overflow float32 (Inf or NaN reach a max pooling or the scores) is
  // refused with std::domain_error naming it; the maps of earlier batches are then already written.
  void compute(const SaliencyRequest& request);

  // Whether this engine still describes `user_net`: its input blob has the same image shape and its
  // layers still hold the weight memory the engine shares (share_with() replaces it). Call with the
  // user's net alive and not running.
  bool matches(const caffe::Net<float>& user_net) const;

  // The same work as compute(), timing every layer call (for the benchmarks).
  std::vector<LayerTime> profile_layers(const SaliencyRequest& request);

  const std::string& input_blob() const { return plan_.input_blob; }
  const std::string& score_blob() const { return plan_.score_blob; }
  const std::vector<int>& image_shape() const { return plan_.image_shape; }
  int num_classes() const { return num_classes_; }
  std::size_t bytes_per_image() const { return bytes_per_image_; }
  const std::vector<std::string>& score_rewrites() const { return plan_.score_rewrites; }
  int batch_size() const { return batch_size_; }
  int device() const { return device_; }
  std::size_t image_size() const;  // floats per input image
  std::size_t map_size() const;    // floats per saliency map

 private:
  struct DeviceBuffers;  // the GPU's seeds and maps, and a pinned host copy of the maps
  void check_classes(const SaliencyRequest& request) const;
  void run(const SaliencyRequest& request, std::vector<LayerTime>* times);
  // One forward of `rows` batch rows starting at unit `first` (an image, or with pairs an (n, k) pair
  // index), then the backward passes of their classes.
  void run_batch(const SaliencyRequest& request, std::int64_t first, int rows, bool pairs,
                 std::vector<LayerTime>* times);
  // Throws std::domain_error naming the first image whose forward pass overflowed float32.
  void check_forward(int rows, const std::function<std::int64_t(int)>& image_of,
                     std::int64_t first_index) const;

  SaliencyNetPlan plan_;
  int num_classes_;
  std::size_t bytes_per_image_;
  int batch_size_;
  int device_;
  BatchLayout layout_;
  std::unique_ptr<DeviceBuffers> device_buffers_;
  std::unique_ptr<SaliencyNet> net_;
  caffe::Blob<float>* input_;
  caffe::Blob<float>* score_;
  int score_layer_;
  std::vector<std::pair<int, int>> shared_layers_;  // (internal, user) indices of layers sharing weights
  mutable std::mutex mutex_;
};

}  // namespace fastsal
