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

struct EngineOptions {
  std::string input_blob;  // empty: the net's first input
  std::string score_blob;  // empty: the bottom of a final Softmax, else the net's only output
  int batch_size = 0;      // images per forward pass; 0: as many as fit memory_budget, at most 32
  std::size_t memory_budget = std::size_t(1) << 30;  // bytes of blobs the internal net may use
};

// One call's buffers, all C-contiguous, sizes checked by the caller.
struct SaliencyRequest {
  const float* images = nullptr;    // (num_images, *image_shape)
  int num_images = 0;
  int classes_per_image = 0;        // K
  const int* classes = nullptr;     // (num_images, K); null: take each image's top-K scores
  int* top_classes = nullptr;       // (num_images, K), written when classes is null
  float* maps = nullptr;            // (num_images, K, H, W)
  float* gradients = nullptr;       // optional (num_images, K, *image_shape)
};

class SaliencyEngine {
 public:
  // Reads the user's net once; afterwards only its weight memory is shared, so the engine stays valid
  // even if the user's net is destroyed.
  SaliencyEngine(const caffe::Net<float>& user_net, const EngineOptions& options);

  // Validates indices, then streams the images through batches. Thread-safe: calls are serialised.
  void compute(const SaliencyRequest& request);

  const std::string& input_blob() const { return plan_.input_blob; }
  const std::string& score_blob() const { return plan_.score_blob; }
  const std::vector<int>& image_shape() const { return plan_.image_shape; }
  int num_classes() const { return plan_.num_classes; }
  int batch_size() const { return batch_size_; }
  int num_layers() const { return static_cast<int>(net_->layers().size()); }
  std::size_t image_size() const;  // floats per input image
  std::size_t map_size() const;    // floats per saliency map

 private:
  void run_batch(const SaliencyRequest& request, int first, int count);

  SaliencyNetPlan plan_;
  int batch_size_;
  std::unique_ptr<caffe::Net<float>> net_;
  caffe::Blob<float>* input_;
  caffe::Blob<float>* score_;
  int score_layer_;
  std::vector<int> batch_classes_;  // (count, K) classes of the batch being run
  std::mutex mutex_;
};

}  // namespace fastsal
