// fastsal's internal net: Caffe's net with some layers' CPU code replaced. Safety swaps always (a max
// pooling whose backward never indexes out of bounds); speed swaps on request (the same values, faster).
// Only fastsal's own copy of the net is affected, never the user's. The layers themselves: cpp/layers/.
#pragma once

#include <caffe/net.hpp>
#include <string>
#include <utility>
#include <vector>

#include "layers/deeplift_layer.hpp"
#include "layers/lrp_rule.hpp"

namespace fastsal {

// How a plain ReLU propagates in the backward pass: its gradient, or an attribution rule.
enum class ReLURule { kGradient, kGuided, kDeconvnet };

struct LayerSwaps {
  bool fast = true;           // the faster CPU layers (same values)
  bool fast_forward = false;  // with fast: the forward's convolutions through oneDNN too (not exact)
  ReLURule relu_rule = ReLURule::kGradient;
  bool bf16_backward = false;  // with fast: the convolutions' data backward in bf16 where the CPU has AMX
  bool bf16_forward = false;   // with fast_forward: the convolutions' forward in bf16 where the CPU has AMX
  // LRP: each named layer's backward follows its rule (CPU only). A convolution with a rule takes in a
  // BatchNorm (and Scale) applied in place to its output, whose backward then passes relevance through.
  std::vector<std::pair<std::string, layers::Rule>> rules;
  // DeepLIFT's Rescale rule on every activation and max pooling (CPU only); any layer that is neither
  // linear nor one of those is refused.
  bool deeplift = false;
};

// The instruction set oneDNN dispatches to on this CPU (DNNL_MAX_CPU_ISA caps it), e.g. "avx512_core_amx";
// empty without oneDNN. And whether the inexact mode's convolution backward runs in bf16 (AMX) there.
std::string onednn_isa();
bool inexact_backward_in_bf16();
// And whether the perturbation methods' inexact forward runs its convolutions in bf16 (AMX) there.
bool perturbation_forward_in_bf16();

class SaliencyNet : public caffe::Net<float> {
 public:
  // Builds the net as Caffe would, then swaps in fastsal's layers.
  SaliencyNet(const caffe::NetParameter& param, const LayerSwaps& swaps);

  // Folds each test-time BatchNorm + Scale pair in place on a convolution's output into that
  // convolution's weights where all three run: in the backward passes of layers [first, last] (the same
  // gradients, rounded otherwise), and in forwards up to `last` when the forward is not exact. Call once
  // the weights' gradients are off.
  void fold_batch_norm(int first, int last);

  // Where a group of blobs joined by element-wise layers (ReLU, Eltwise, Split, folded BatchNorm and
  // Scale) is read and written only by oneDNN forward convolutions that want their channel-blocked
  // layout, the group's blobs hold that layout, data and diff: no reorders between those convolutions
  // (not exact only; a fifth of open_nsfw's time). Blobs in `plain`, those read by anything else, and
  // those whose channels nChw16c would pad keep Caffe's NCHW. Call after fold_batch_norm.
  // Forward-only nets, not exact: a plain ReLU in place on a oneDNN convolution's output (after the
  // BatchNorm and Scale it folds) runs inside the convolution's forward, in layers [0, last].
  void fuse_relus(int last);
  const std::vector<std::string>& fused_relus() const { return fused_relus_; }

  void keep_blocked_layouts(const std::vector<const caffe::Blob<float>*>& plain);
  const std::vector<std::string>& blocked_blobs() const { return blocked_blobs_; }

  // After the shared weights were written in place (MPRT re-draws layers of its copy of the net): the
  // caches built from them (LRP's modified weights, the oneDNN convolutions' folded and reordered weights)
  // are rebuilt at the next pass, as in a freshly built net. BatchNorm's statistics are read at every pass.
  void reload_weights();

  // After a CPU forward of layers [0, last]: the first batch row in which a max pooling window held no
  // number (all NaN or -Inf: the activations overflowed), and that layer's name; -1 when none did.
  int first_overflowed_row(int last, std::string* layer) const;

  // Bytes per batch row of the buffers fastsal's layers share (the oneDNN convolutions' blocked copies
  // of their inputs and outputs), beyond what net_surgery's bytes_per_image counts. At batch 1.
  std::size_t workspace_bytes_per_image() const;

  // DeepLIFT: which forward runs next (layers/deeplift_layer.hpp). No-op on a net without its layers.
  void set_deeplift_pass(layers::DeepLiftPass pass) {
    if (deeplift_) *deeplift_ = pass;
  }

 private:
  void merge_batch_norm();  // LRP's canonizer: see LayerSwaps::rules
  layers::DeepLiftState deeplift_;
  std::vector<std::string> blocked_blobs_, fused_relus_;
};

}  // namespace fastsal
