// The net's head: the chain of layers just below the score whose backward reads no per-image state but
// a ReLU's sign (InnerProduct, ReLU, test-time Dropout), as VGG's fc6-fc8 are. Its backward for K
// classes runs as one GEMM per layer over K x rows seeds, so fc6's 411 MB of weights are read once per
// batch instead of once per class; the rest of the net then runs one backward per class as before.
#pragma once

#include <caffe/net.hpp>
#include <vector>

#include "saliency_net.hpp"

namespace fastsal {

class ClassHead {
 public:
  // The head of layers (stop_layer, score_layer] that qualify, walking down from the score; empty when
  // the score layer itself does not (a convolution, say).
  ClassHead(const caffe::Net<float>& net, int score_layer, int stop_layer, ReLURule relu_rule);

  bool empty() const { return layers_.empty(); }
  // The lowest head layer: the per-class backward continues below it, from its bottom blob's diff.
  int first_layer() const { return layers_.back(); }
  caffe::Blob<float>* bottom() const { return bottom_; }

  // After a forward of `rows` rows: for passes [first_pass, first_pass + count), the bottom blob's diff
  // for one-hot seeds at class row_classes[r * passes + pass] of the score, as (count, rows, bottom
  // floats), in a buffer the head owns until the next call. layer_seconds (by layer index) gets times.
  const float* backward(int rows, const int* row_classes, int passes, int first_pass, int count,
                        std::vector<double>* layer_seconds);

  // Passes per backward() call that keep its two buffers within `bytes`.
  int passes_within(int rows, std::size_t bytes) const;

 private:
  const caffe::Net<float>& net_;
  ReLURule relu_rule_;
  std::vector<int> layers_;  // from the score layer down
  caffe::Blob<float>* bottom_ = nullptr;
  std::size_t widest_ = 0;  // floats per row of the widest diff in the head
  std::vector<float> buffer_;
};

}  // namespace fastsal
