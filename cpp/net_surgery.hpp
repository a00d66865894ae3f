// Plans fastsal's internal saliency net from a user's deploy net: the layers the score blob depends on,
// force_backward, TEST phase, a free batch dimension. Every check that Caffe would answer with a glog
// CHECK (and abort) is made here first and reported as std::invalid_argument.
#pragma once

#include <caffe/proto/caffe.pb.h>

#include <caffe/net.hpp>
#include <cstddef>
#include <string>
#include <vector>

namespace fastsal {

struct SaliencyNetPlan {
  caffe::NetParameter param;        // the internal net; its input batch dimension is set by with_batch_size()
  std::string input_blob;           // differentiated with respect to this blob
  std::string score_blob;           // whose entries are the class scores
  std::vector<int> image_shape;     // one input image: the input blob's shape without the batch axis
  int num_classes = 0;              // entries of the score blob per image
  std::size_t bytes_per_image = 0;  // data + diff of every blob the internal net keeps, and layer state

  caffe::NetParameter with_batch_size(int batch_size) const;
};

// The layer that writes a blob's final value: the last one with it among its tops (in-place layers
// write the same blob again); -1 when no layer does.
int producer_of(const caffe::Net<float>& net, int blob_id);

// input_blob / score_blob may be empty: the net's first input / the bottom of a final Softmax, else the
// net's only output.
SaliencyNetPlan plan_saliency_net(const caffe::Net<float>& net, const std::string& input_blob,
                                  const std::string& score_blob);

}  // namespace fastsal
