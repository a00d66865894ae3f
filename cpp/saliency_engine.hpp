// The saliency engine: a force_backward copy of the user's net that shares its weights, runs one forward
// per batch of images and one data-only backward per class, and reduces the input gradient to maps.
// It knows nothing of Python: it takes a caffe::Net, pointers and sizes, and writes into caller buffers.
#pragma once

#include <caffe/net.hpp>
#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "net_surgery.hpp"

namespace fastsal {

// How one call's (image, class) pairs go through the net.
enum class BatchLayout {
  kAuto,      // kPerClass on the CPU; kPairs on a GPU when the images alone leave the batch under-filled
  kPerClass,  // one forward per batch of images, then one backward per class
  kPairs,     // each image repeated K times in the batch, a genuine forward at that size, one backward
};

struct BatchPlan {
  bool pairs;           // the batch carries (image, class) pairs
  int images_per_pass;  // images per forward pass
};

// A CPU pass costs about the same per image at any batch size, so repeating an image K times costs K
// forwards: one forward and K backwards is cheaper (about (1 + K) F against 2 K F). A GPU pass costs
// about the same until the batch fills the device (batch_size is that size): with fewer images than
// that, ceil(N K / B) full passes beat one forward plus K under-filled backwards. Replicating
// activations instead of forwarding would be wrong for MaxPool, LRN, BatchNorm, PReLU, Eltwise MAX.
BatchPlan plan_batches(BatchLayout layout, bool on_gpu, int num_images, int classes_per_image,
                       int batch_size);

struct EngineOptions {
  std::string input_blob;   // empty: the net's first input
  std::string score_blob;   // empty: the bottom of a final Softmax, else the net's only output
  int batch_size = 0;       // images per forward pass; 0: as many as fit memory_budget, at most 16
  bool fast_layers = true;  // fastsal's faster CPU layers (fast_layers.hpp); false: Caffe's own code only
  int device = -1;          // -1: CPU; else the CUDA device (a CUDA build of Caffe and fastsal)
  BatchLayout layout = BatchLayout::kAuto;
  std::size_t memory_budget = std::size_t(1) << 30;  // bytes of blobs the internal net may use
};

// One call's buffers, all C-contiguous, sizes checked by the caller.
struct SaliencyRequest {
  const float* images = nullptr;  // (num_images, *image_shape)
  int num_images = 0;
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
  void compute(const SaliencyRequest& request);

  // The same work as compute(), timing every layer call (for the benchmarks).
  std::vector<LayerTime> profile_layers(const SaliencyRequest& request);

  const std::string& input_blob() const { return plan_.input_blob; }
  const std::string& score_blob() const { return plan_.score_blob; }
  const std::vector<int>& image_shape() const { return plan_.image_shape; }
  int num_classes() const { return plan_.num_classes; }
  int batch_size() const { return batch_size_; }
  int device() const { return device_; }
  std::size_t image_size() const;  // floats per input image
  std::size_t map_size() const;    // floats per saliency map

 private:
  struct DeviceBuffers;  // the GPU's seeds and maps, and a pinned host copy of the maps
  void check_classes(const SaliencyRequest& request) const;
  void run(const SaliencyRequest& request, std::vector<LayerTime>* times);
  // One forward of images [first, first + count), then the backward passes of their classes.
  void run_batch(const SaliencyRequest& request, int first, int count, bool pairs,
                 std::vector<LayerTime>* times);

  SaliencyNetPlan plan_;
  int batch_size_;
  int device_;
  BatchLayout layout_;
  std::unique_ptr<DeviceBuffers> device_buffers_;
  std::unique_ptr<caffe::Net<float>> net_;
  caffe::Blob<float>* input_;
  caffe::Blob<float>* score_;
  int score_layer_;
  std::vector<int> batch_classes_;  // (count, K) seeds of the batch being run
  std::mutex mutex_;
};

}  // namespace fastsal
