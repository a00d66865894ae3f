// Plans fastsal's internal saliency net from a user's deploy net: the layers the score depends on,
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
  caffe::NetParameter param;     // the internal net, its input at batch 1 (the engine resizes it per batch)
  std::string input_blob;        // differentiated with respect to this blob
  std::string score_blob;        // whose entries are the class scores
  std::string score_layer;       // the last layer the score is read after (an in-place Softmax never is)
  std::vector<int> image_shape;  // one input image: the input blob's shape without the batch axis
  std::vector<int> user_image_shape;        // the user's input blob's, when planned (image_shape may differ)
  std::vector<std::string> score_rewrites;  // in-place layers after the score's producer, kept (documented)
  std::string
      gradient_blob;  // the gradient is taken here: the input blob, or a blob between it and the score
  std::string gradient_layer;  // the backward stops after this layer (empty: runs to the input)
};

// The layer that writes a blob's final value: the last one with it among its tops (in-place layers
// write the same blob again); -1 when no layer does. `before` limits the search to layers < before.
int producer_of(const caffe::Net<float>& net, int blob_id, int before = -1);

// The index of the blob called `name`; else throws, naming up to three blobs with a name like it (the
// net's full list is net.blobs in pycaffe). `role` says what the caller wanted it for: "score", "layer".
int find_blob(const caffe::Net<float>& net, const std::string& name, const std::string& role);

// The default score: the input of the net's one Softmax whose output nobody consumes (pre-softmax
// scores, as Simonyan et al. use), else the net's only output. Several candidates: refuse, naming them.
std::string default_score_blob(const caffe::Net<float>& net);

// input_blob / score_blob / gradient_blob may be empty: the net's first input / the bottom of the net's
// one Softmax output, else the net's only output / the input. Reads only the net's layers and its input
// blob's (C, H, W): never the batch size or the other blobs' current shapes, which pycaffe users change.
// A non-empty image_shape (C, H, W) replaces the input blob's (the layers must take it: check_weights_fit).
SaliencyNetPlan plan_saliency_net(const caffe::Net<float>& net, const std::string& input_blob,
                                  const std::string& score_blob, const std::string& gradient_blob = "",
                                  const std::vector<int>& image_shape = {});

// Throws if a layer of `internal` would not take the user's weights as they are (ShareTrainedLayersWith
// CHECK-aborts on a count or shape mismatch), naming the layer and both shapes.
void check_weights_fit(const caffe::Net<float>& internal, const caffe::Net<float>& user);

// Bytes per image of everything the net keeps per batch row: data and diff (with `diffs`) of every blob,
// and the layers' hidden state (fastsal's own with `fast_layers`). `net` must be at batch 1.
std::size_t bytes_per_image(const caffe::Net<float>& net, bool fast_layers, bool diffs = true);

}  // namespace fastsal
