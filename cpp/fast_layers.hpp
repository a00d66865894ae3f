// fastsal's internal net: Caffe's net with a few layers' CPU backward passes replaced by versions that
// compute the same values faster. Only fastsal's own copy of the net is affected, never the user's.
#pragma once

#include <caffe/net.hpp>
#include <cstdint>

namespace fastsal {

class SaliencyNet : public caffe::Net<float> {
 public:
  // Builds the net as Caffe would, then swaps in the faster layers.
  explicit SaliencyNet(const caffe::NetParameter& param);
};

// ReLU as Caffe computes it, plus a byte mask of x > 0 written while the data is hot. Caffe's backward
// re-reads x (cold by then, and once per class) in a scalar loop; the mask is a quarter of that.
void relu_forward(const float* bottom_data, float* top_data, std::uint8_t* positive, std::int64_t count,
                  float negative_slope);
void relu_backward(const std::uint8_t* positive, const float* top_diff, float* bottom_diff,
                   std::int64_t count);

}  // namespace fastsal
