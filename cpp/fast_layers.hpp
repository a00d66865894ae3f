// fastsal's internal net: Caffe's net with a few layers' CPU backward passes replaced by versions that
// compute the same values faster. Only fastsal's own copy of the net is affected, never the user's.
#pragma once

#include <caffe/net.hpp>

namespace fastsal {

class SaliencyNet : public caffe::Net<float> {
 public:
  // Builds the net as Caffe would, then swaps in the faster layers.
  explicit SaliencyNet(const caffe::NetParameter& param);
};

}  // namespace fastsal
