// fastsal's internal net: Caffe's net with some layers' CPU code replaced. Safety swaps always (a max
// pooling whose backward never indexes out of bounds); speed swaps on request (the same values, faster).
// Only fastsal's own copy of the net is affected, never the user's.
#pragma once

#include <caffe/net.hpp>
#include <string>

namespace fastsal {

class SaliencyNet : public caffe::Net<float> {
 public:
  // Builds the net as Caffe would, then swaps in fastsal's layers; fast_layers adds the faster ones.
  SaliencyNet(const caffe::NetParameter& param, bool fast_layers);

  // After a CPU forward of layers [0, last]: the first batch row in which a max pooling window held no
  // number (all NaN or -Inf: the activations overflowed), and that layer's name; -1 when none did.
  int first_overflowed_row(int last, std::string* layer) const;
};

}  // namespace fastsal
