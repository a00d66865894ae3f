// Caffe's Split layer with its backward's sum of the tops' diffs spread over the cores.
#pragma once

#include <caffe/layers/split_layer.hpp>
#include <vector>

namespace fastsal::layers {

// Split's backward sums its tops' diffs, (a + b) + c ..., as Caffe's add and axpy do, over the cores.
class SplitLayer : public caffe::SplitLayer<float> {
 public:
  using caffe::SplitLayer<float>::SplitLayer;

 protected:
  void Backward_cpu(const std::vector<caffe::Blob<float>*>& top, const std::vector<bool>& propagate_down,
                    const std::vector<caffe::Blob<float>*>& bottom) override;
};

}  // namespace fastsal::layers
