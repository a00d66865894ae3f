#include "saliency_net.hpp"

#include <algorithm>
#include <cstddef>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "layers/batch_norm_layer.hpp"
#include "layers/convolution_layer.hpp"
#include "layers/deeplift_layer.hpp"
#include "layers/dnnl_common.hpp"
#include "layers/dnnl_conv_layer.hpp"
#include "layers/eltwise_layer.hpp"
#include "layers/inner_product_layer.hpp"
#include "layers/pass_layer.hpp"
#include "layers/pooling_layer.hpp"
#include "layers/relu_layer.hpp"
#include "layers/scale_layer.hpp"
#include "layers/split_layer.hpp"
#ifdef FASTSAL_WITH_DNNL
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace fastsal {

using layers::BatchNormLayer;
using layers::EltwiseLayer;
using layers::InnerProductLayer;
using layers::PassLayer;
using layers::PoolingLayer;
using layers::ReLULayer;
using layers::RescaleLayer;
using layers::RescalePoolingLayer;
using layers::Rule;
using layers::RuleConvolutionLayer;
using layers::RuleEltwiseLayer;
using layers::RuleInnerProductLayer;
using layers::RuleKind;
using layers::RulePoolingLayer;
using layers::RuleReLULayer;
using layers::ScaleLayer;
using layers::SplitLayer;
#ifdef FASTSAL_WITH_DNNL
using layers::cpu_has_amx;
using layers::DnnlConvolutionLayer;
using layers::Workspace;
#endif

namespace {

// DeepLIFT's cover: activations take the Rescale rule, max pooling Captum's rule, linear layers keep their
// gradient (which is the rule for them). Anything else is refused, naming it.
enum class DeepLiftRole { kNone, kLinear, kMaxPooling, kRescale };

DeepLiftRole deeplift_role(const caffe::LayerParameter& p, int tops) {
  static const std::vector<std::string> linear = {
      "Input", "Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale",  "Bias",
      "Split", "Concat",      "Slice",         "Dropout",      "Flatten",   "Reshape"};
  const std::string& type = p.type();
  if (std::find(linear.begin(), linear.end(), type) != linear.end()) return DeepLiftRole::kLinear;
  if (type == "Eltwise" && p.eltwise_param().operation() == caffe::EltwiseParameter_EltwiseOp_SUM)
    return DeepLiftRole::kLinear;
  if (type == "Pooling" && p.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_AVE)
    return DeepLiftRole::kLinear;
  if (type == "Pooling" && p.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_MAX && tops == 1)
    return DeepLiftRole::kMaxPooling;
  if (type == "ReLU" || type == "Sigmoid" || type == "TanH" || type == "ELU") return DeepLiftRole::kRescale;
  return DeepLiftRole::kNone;
}

}  // namespace

std::string onednn_isa() {
#ifdef FASTSAL_WITH_DNNL
  using isa = dnnl::cpu_isa;
  const std::pair<isa, const char*> names[] = {{isa::avx512_core_amx, "avx512_core_amx"},
                                               {isa::avx512_core_bf16, "avx512_core_bf16"},
                                               {isa::avx512_core_vnni, "avx512_core_vnni"},
                                               {isa::avx512_core, "avx512_core"},
                                               {isa::avx2_vnni, "avx2_vnni"},
                                               {isa::avx2, "avx2"},
                                               {isa::avx, "avx"},
                                               {isa::sse41, "sse41"}};
  const auto effective = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  for (const auto& [value, name] : names)  // each ISA's mask includes those below it
    if ((effective & static_cast<unsigned>(value)) == static_cast<unsigned>(value)) return name;
  return "unknown";
#else
  return "";
#endif
}

bool inexact_backward_in_bf16() {
#ifdef FASTSAL_WITH_DNNL
  return cpu_has_amx();
#else
  return false;
#endif
}

bool perturbation_forward_in_bf16() {
#ifdef FASTSAL_WITH_DNNL
  return cpu_has_amx();
#else
  return false;
#endif
}

SaliencyNet::SaliencyNet(const caffe::NetParameter& param, const LayerSwaps& swaps)
    : caffe::Net<float>(param) {
  // Each replacement gets the same parameter and the old layer's blobs (so nothing is re-initialised,
  // and weights shared later are shared with it), then is set up on the same bottoms and tops.
#ifdef FASTSAL_WITH_DNNL
  const auto workspace = std::make_shared<Workspace>();
#endif
  if (swaps.deeplift) {
    deeplift_ = std::make_shared<layers::DeepLiftPass>(layers::DeepLiftPass::kPlain);
    for (std::size_t i = 0; i < layers_.size(); ++i)
      if (deeplift_role(layers_[i]->layer_param(), static_cast<int>(top_vecs_[i].size())) ==
          DeepLiftRole::kNone)
        throw std::invalid_argument(
            "method='deeplift' has no rule for layer '" + layer_names_[i] + "' (" + layers_[i]->type() +
            "): DeepLIFT's Rescale rule covers ReLU (leaky too), Sigmoid, TanH, ELU and max pooling (one "
            "top), and linear layers (Convolution, InnerProduct, BatchNorm, Scale, Bias, Eltwise SUM, "
            "average pooling, Split, Concat, Slice, Dropout, Flatten, Reshape) keep their gradient");
  }
  const auto scratch = std::make_shared<layers::RuleScratch>();  // LRP rules' transient buffers
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    const std::string type = layers_[i]->type();
    const caffe::LayerParameter& p = layers_[i]->layer_param();
    boost::shared_ptr<caffe::Layer<float>> layer;
    const bool plain_relu = type == "ReLU" && p.relu_param().negative_slope() == 0.f;
    const auto ruled = std::find_if(swaps.rules.begin(), swaps.rules.end(),
                                    [&](const auto& entry) { return entry.first == layer_names_[i]; });
    const Rule* rule =
        ruled == swaps.rules.end() || ruled->second.kind == RuleKind::kGradient ? nullptr : &ruled->second;
    const bool linear = rule && layers::linear_rule(rule->kind);
    const DeepLiftRole role =
        deeplift_ ? deeplift_role(p, static_cast<int>(top_vecs_[i].size())) : DeepLiftRole::kNone;
    const bool rescale = role == DeepLiftRole::kRescale;
    if (rule && rule->kind != RuleKind::kPass &&
        !(linear && (type == "Convolution" || type == "InnerProduct")) &&
        !(rule->kind == RuleKind::kNorm && (type == "Eltwise" || type == "Pooling")))
      throw std::invalid_argument("layer '" + layer_names_[i] + "' (" + type +
                                  ") cannot take the rule given it");
    if (linear && type == "Convolution") {
      auto* conv = new RuleConvolutionLayer(p, *rule, scratch);
#ifdef FASTSAL_WITH_DNNL
      if (swaps.fast) conv->use_onednn(workspace, swaps.fast_forward);
#endif
      layer.reset(conv);
    } else if (linear) {
      layer.reset(new RuleInnerProductLayer(p, *rule, scratch));
    } else if (rule && rule->kind == RuleKind::kNorm && type == "Eltwise") {
      layer.reset(new RuleEltwiseLayer(p, rule->epsilon));
    } else if (rule && rule->kind == RuleKind::kNorm) {
      layer.reset(new RulePoolingLayer(p, rule->epsilon));
    } else if (role == DeepLiftRole::kMaxPooling) {
      layer.reset(new RescalePoolingLayer(p, deeplift_));
    } else if (type == "Pooling") {
      layer.reset(new PoolingLayer(p));
    } else if (plain_relu && swaps.relu_rule != ReLURule::kGradient) {
      layer.reset(new RuleReLULayer(p, swaps.relu_rule == ReLURule::kGuided));
    } else if (swaps.fast && type == "ReLU") {
      layer.reset(new ReLULayer(p));
    } else if (swaps.fast && type == "BatchNorm") {
      layer.reset(new BatchNormLayer(p));
    } else if (swaps.fast && type == "Scale") {
      layer.reset(new ScaleLayer(p));
    } else if (swaps.fast && type == "Eltwise") {
      layer.reset(new EltwiseLayer(p));
    } else if (swaps.fast && type == "Split") {
      layer.reset(new SplitLayer(p));
    } else if (swaps.fast && type == "InnerProduct") {
      layer.reset(new InnerProductLayer(p, swaps.fast_forward));
#ifdef FASTSAL_WITH_DNNL
    } else if (swaps.fast && type == "Convolution" &&
               DnnlConvolutionLayer::supports(p, *bottom_vecs_[i][0])) {
      layer.reset(new DnnlConvolutionLayer(p, swaps.fast_forward, swaps.bf16_forward, swaps.bf16_backward,
                                           workspace));
#endif
    } else if (!rule && !rescale) {
      continue;
    }
    if (rescale) {  // around whichever layer runs the forward, as the Pass rule
      if (layer) {
        layer->blobs() = layers_[i]->blobs();
        layer->SetUp(bottom_vecs_[i], top_vecs_[i]);
      }
      layer.reset(new RescaleLayer(layer ? layer : layers_[i], deeplift_));
    }
    if (rule && rule->kind == RuleKind::kPass) {  // around whichever layer runs the forward
      if (layer) {
        layer->blobs() = layers_[i]->blobs();
        layer->SetUp(bottom_vecs_[i], top_vecs_[i]);
      }
      layer.reset(new PassLayer(layer ? layer : layers_[i]));
    }
    layer->blobs() = layers_[i]->blobs();
    layer->SetUp(bottom_vecs_[i], top_vecs_[i]);
    layers_[i] = layer;
  }
  if (!swaps.rules.empty()) merge_batch_norm();
}

void SaliencyNet::merge_batch_norm() {
  for (std::size_t i = 0; i + 1 < layers_.size(); ++i) {
    auto* conv = dynamic_cast<RuleConvolutionLayer*>(layers_[i].get());
    if (!conv || top_vecs_[i].size() != 1) continue;
    caffe::Blob<float>* blob = top_vecs_[i][0];
    const auto in_place = [&](std::size_t l, const char* type) {
      return l < layers_.size() && std::string(layers_[l]->type()) == type && bottom_vecs_[l].size() == 1 &&
             top_vecs_[l].size() == 1 && bottom_vecs_[l][0] == blob && top_vecs_[l][0] == blob;
    };
    if (!in_place(i + 1, "BatchNorm")) continue;
    const auto& norm_param = layers_[i + 1]->layer_param().batch_norm_param();
    if (norm_param.has_use_global_stats() && !norm_param.use_global_stats()) continue;
    const bool scale = in_place(i + 2, "Scale") && layers_[i + 2]->blobs()[0]->count() == blob->shape(1) &&
                       layers_[i + 2]->layer_param().scale_param().axis() == 1;
    // The merged layers pass relevance through; their forward is unchanged.
    const auto inner = [&](std::size_t l) -> caffe::Layer<float>* {
      if (!dynamic_cast<PassLayer*>(layers_[l].get())) {
        boost::shared_ptr<caffe::Layer<float>> pass(new PassLayer(layers_[l]));
        pass->blobs() = layers_[l]->blobs();
        pass->SetUp(bottom_vecs_[l], top_vecs_[l]);
        layers_[l] = pass;
      }
      return &dynamic_cast<PassLayer*>(layers_[l].get())->inner();
    };
    caffe::Layer<float>* norm = inner(i + 1);
    conv->merge_batch_norm(norm, scale ? inner(i + 2) : nullptr);
  }
}

void SaliencyNet::fold_batch_norm(int first, int last) {
#ifdef FASTSAL_WITH_DNNL
  for (std::size_t i = 0; i + 2 < layers_.size(); ++i) {
    auto* conv = dynamic_cast<DnnlConvolutionLayer*>(layers_[i].get());
    auto* norm = dynamic_cast<BatchNormLayer*>(layers_[i + 1].get());
    auto* scale = dynamic_cast<ScaleLayer*>(layers_[i + 2].get());
    if (!conv || !norm || !scale || top_vecs_[i].size() != 1) continue;
    caffe::Blob<float>* blob = top_vecs_[i][0];
    bool in_place = true;  // one blob through all three: nothing else sees the values in between
    for (std::size_t l = i + 1; l <= i + 2; ++l)
      in_place = in_place && bottom_vecs_[l].size() == 1 && top_vecs_[l].size() == 1 &&
                 bottom_vecs_[l][0] == blob && top_vecs_[l][0] == blob;
    if (!in_place || !norm->global_statistics() || !scale->per_channel(blob->shape(1)) || !conv->can_fold())
      continue;
    const int at = static_cast<int>(i);
    const bool forward = conv->dnnl_forward() && at + 2 <= last;
    const bool backward = first <= at && at + 2 <= last;
    conv->fold(norm, scale, forward, backward);
    const bool idle = backward || at + 2 < first;  // below `first` no backward runs: nothing left to do
    norm->fold(forward, idle);
    scale->fold(forward, idle);
  }
#else
  (void)first, (void)last;
#endif
}

void SaliencyNet::fuse_relus(int last) {
#ifdef FASTSAL_WITH_DNNL
  for (int i = 0; i < last && i < static_cast<int>(layers_.size()); ++i) {
    auto* conv = dynamic_cast<DnnlConvolutionLayer*>(layers_[i].get());
    if (!conv || top_vecs_[i].size() != 1) continue;
    const int j = i + (conv->folds_forward() ? 3 : 1);  // the folded BatchNorm and Scale do nothing
    auto* relu = j <= last ? dynamic_cast<ReLULayer*>(layers_[j].get()) : nullptr;
    caffe::Blob<float>* blob = top_vecs_[i][0];
    if (relu && relu->plain() && bottom_vecs_[j][0] == blob && top_vecs_[j][0] == blob && conv->fuse_relu()) {
      relu->skip_forward();
      fused_relus_.push_back(layer_names_[j]);
    }
  }
#else
  (void)last;
#endif
}

#ifdef FASTSAL_WITH_DNNL
namespace {

// Layers that treat every element alike (the folded BatchNorm and Scale do nothing): any layout their
// blobs share gives the same values.
bool element_wise(const caffe::Layer<float>& layer) {
  if (const auto* norm = dynamic_cast<const BatchNormLayer*>(&layer)) return norm->folded();
  if (const auto* scale = dynamic_cast<const ScaleLayer*>(&layer)) return scale->folded();
  return dynamic_cast<const ReLULayer*>(&layer) || dynamic_cast<const RuleReLULayer*>(&layer) ||
         dynamic_cast<const EltwiseLayer*>(&layer) || dynamic_cast<const SplitLayer*>(&layer);
}

}  // namespace
#endif

void SaliencyNet::keep_blocked_layouts(const std::vector<const caffe::Blob<float>*>& plain) {
#ifdef FASTSAL_WITH_DNNL
  using tag = dnnl::memory::format_tag;
  // Blobs joined by an element-wise layer share one layout (and one shape): groups, by union-find.
  std::vector<int> parent(blobs_.size());
  std::iota(parent.begin(), parent.end(), 0);
  const auto root = [&parent](int b) {
    while (parent[b] != b) b = parent[b] = parent[parent[b]];
    return b;
  };
  // Per blob, the layout its convolutions want; tag::any: none asked yet; tag::undef: Caffe's NCHW.
  // Two wishes agree or the answer is NCHW.
  const auto merge = [](tag& into, tag layout) {
    into = into == tag::any || into == layout ? layout : tag::undef;
  };
  std::vector<tag> wanted(blobs_.size(), tag::any);
  for (std::size_t b = 0; b < blobs_.size(); ++b)
    if (blobs_[b]->num_axes() != 4 || std::find(plain.begin(), plain.end(), blobs_[b].get()) != plain.end())
      wanted[b] = tag::undef;
  for (const int b : net_input_blob_indices_) wanted[b] = tag::undef;
  for (std::size_t l = 0; l < layers_.size(); ++l) {
    const std::vector<int>& bottoms = bottom_id_vecs_[l];
    const std::vector<int>& tops = top_id_vecs_[l];
    if (const auto* conv = dynamic_cast<const DnnlConvolutionLayer*>(layers_[l].get())) {
      const bool single = bottoms.size() == 1 && tops.size() == 1;  // one reorder serves every pair
      for (const int b : bottoms) merge(wanted[b], single ? conv->chosen_layout(true) : tag::undef);
      for (const int t : tops) merge(wanted[t], single ? conv->chosen_layout(false) : tag::undef);
    } else if (element_wise(*layers_[l])) {
      const int first = bottoms.empty() ? tops.front() : bottoms.front();
      for (const auto* ids : {&bottoms, &tops})
        for (const int b : *ids) parent[root(b)] = root(first);
    } else {  // Caffe's own code, pooling, products, the input...: they index NCHW
      for (const auto* ids : {&bottoms, &tops})
        for (const int b : *ids) wanted[b] = tag::undef;
    }
  }
  std::vector<tag> layout(blobs_.size(), tag::any);  // per group root: what all its members want
  for (std::size_t b = 0; b < blobs_.size(); ++b)
    if (wanted[b] != tag::any) merge(layout[root(int(b))], wanted[b]);
  // A layout that pads (nChw16c on 24 channels) does not fit in the blob.
  for (std::size_t b = 0; b < blobs_.size(); ++b) {
    tag& group = layout[root(int(b))];
    const caffe::Blob<float>& blob = *blobs_[b];
    if (group != tag::any && group != tag::undef &&
        dnnl::memory::desc({blob.shape(0), blob.shape(1), blob.shape(2), blob.shape(3)},
                           dnnl::memory::data_type::f32, group)
                .get_size() != blob.count() * sizeof(float))
      group = tag::undef;
  }
  const auto layout_of = [&](int b) { return layout[root(b)] == tag::any ? tag::undef : layout[root(b)]; };
  for (std::size_t l = 0; l < layers_.size(); ++l)
    if (auto* conv = dynamic_cast<DnnlConvolutionLayer*>(layers_[l].get()))
      if (bottom_id_vecs_[l].size() == 1 && top_id_vecs_[l].size() == 1)
        conv->hold_layouts(layout_of(bottom_id_vecs_[l][0]), layout_of(top_id_vecs_[l][0]));
  blocked_blobs_.clear();
  for (std::size_t b = 0; b < blobs_.size(); ++b)
    if (layout_of(int(b)) != tag::undef) blocked_blobs_.push_back(blob_names_[b]);
  Reshape();  // the convolutions rebuild their reorders now, so the workspace's size is known
#else
  (void)plain;
#endif
}

void SaliencyNet::reload_weights() {
  for (const auto& layer : layers_) {
    caffe::Layer<float>* inner = layer.get();
    if (auto* pass = dynamic_cast<PassLayer*>(inner)) inner = &pass->inner();
    if (auto* conv = dynamic_cast<RuleConvolutionLayer*>(inner)) conv->reload_weights();
    if (auto* product = dynamic_cast<RuleInnerProductLayer*>(inner)) product->reload_weights();
#ifdef FASTSAL_WITH_DNNL
    if (auto* conv = dynamic_cast<DnnlConvolutionLayer*>(inner)) conv->reload_weights();
#endif
  }
}

int SaliencyNet::first_overflowed_row(int last, std::string* layer) const {
  int first = -1;
  for (int l = 0; l <= last; ++l) {
    const auto* pooling = dynamic_cast<const PoolingLayer*>(layers_[l].get());
    if (!pooling || pooling->overflowed_row() < 0) continue;
    if (first < 0 || pooling->overflowed_row() < first) {
      first = pooling->overflowed_row();
      *layer = "layer '" + layer_names_[l] + "' (Pooling)";
    }
  }
  return first;
}

std::size_t SaliencyNet::workspace_bytes_per_image() const {
  std::size_t bytes = 0;
  std::int64_t scratch = 0;  // LRP rules keep their denominators, and share their products' buffers
  for (const auto& layer : layers_) {
    if (const auto* conv = dynamic_cast<const RuleConvolutionLayer*>(layer.get())) {
      bytes += conv->rule_floats_per_image() * sizeof(float);
      scratch = std::max(scratch, conv->rule_scratch_floats_per_image());
    }
    if (const auto* product = dynamic_cast<const RuleInnerProductLayer*>(layer.get())) {
      bytes += product->rule_floats_per_image() * sizeof(float);
      scratch = std::max(scratch, product->rule_scratch_floats_per_image());
    }
    if (const auto* rescale = dynamic_cast<const RescaleLayer*>(layer.get()))  // DeepLIFT's kept values
      bytes += rescale->floats_per_image() * sizeof(float);
    if (const auto* pooling = dynamic_cast<const RescalePoolingLayer*>(layer.get()))
      bytes += pooling->floats_per_image() * sizeof(float);
  }
  bytes += scratch * sizeof(float);
#ifdef FASTSAL_WITH_DNNL
  // Not the scratchpads: measured on a Winograd layer, ~80% of its scratchpad does not grow with the batch.
  for (const auto slot : {Workspace::kInput, Workspace::kOutput}) {
    std::size_t largest = 0;  // the slot is shared: it grows to the largest layer's need
    for (const auto& layer : layers_)
      if (const auto* conv = dynamic_cast<const DnnlConvolutionLayer*>(layer.get()))
        largest = std::max(largest, conv->workspace_bytes(slot));
    bytes += largest;
  }
#endif
  return bytes;
}

}  // namespace fastsal
