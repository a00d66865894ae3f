#include "net_surgery.hpp"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include <algorithm>
#include <set>
#include <sstream>
#include <stdexcept>

namespace fastsal {
namespace {

using google::protobuf::FieldDescriptor;
using google::protobuf::Message;

std::invalid_argument error(const std::string& message) { return std::invalid_argument(message); }

std::string describe(const caffe::Net<float>& net, int layer) {
  return "layer '" + net.layer_names()[layer] + "' (" + net.layers()[layer]->type() + ")";
}

std::string join_names(const caffe::Net<float>& net, const std::vector<int>& blob_ids) {
  std::string names;
  for (int id : blob_ids) names += (names.empty() ? "'" : ", '") + net.blob_names()[id] + "'";
  return names.empty() ? "none" : names;
}

int blob_id(const caffe::Net<float>& net, const std::string& name, const char* role) {
  const auto& names = net.blob_names();
  const auto it = std::find(names.begin(), names.end(), name);
  if (it == names.end()) {
    std::string known;
    for (const auto& n : names) known += (known.empty() ? "" : ", ") + n;
    throw error(std::string("unknown ") + role + " blob '" + name + "'; the net's blobs are: " + known);
  }
  return static_cast<int>(it - names.begin());
}

// Layers whose backward pass to their bottoms is missing, or aborts under force_backward.
void check_differentiable(const caffe::Net<float>& net, int layer) {
  static const std::set<std::string> no_input_gradient = {
      "ArgMax",    "Threshold", "Embed",      "Python",     "Filter",   "BatchReindex",
      "Accuracy",  "Recurrent", "RNN",        "LSTM",       "LSTMUnit", "Data",
      "ImageData", "HDF5Data",  "WindowData", "MemoryData", "DummyData"};
  const caffe::LayerParameter& p = net.layers()[layer]->layer_param();
  const std::string type = p.type();
  const bool is_loss = type.size() >= 4 && type.compare(type.size() - 4, 4, "Loss") == 0;
  if (no_input_gradient.count(type) || is_loss)
    throw error(describe(net, layer) +
                " has no gradient with respect to its input, so no saliency "
                "can flow through it; choose a score blob before it with score=");
  if (type == "Pooling" && p.pooling_param().pool() == caffe::PoolingParameter_PoolMethod_STOCHASTIC)
    throw error(describe(net, layer) + " uses STOCHASTIC pooling, which Caffe cannot differentiate");
  if (type == "BatchNorm" && p.batch_norm_param().has_use_global_stats() &&
      !p.batch_norm_param().use_global_stats())
    throw error(describe(net, layer) +
                " sets use_global_stats: false: its output would depend on the "
                "other images in a batch, and Caffe would overwrite the shared moving averages");
}

// A layer working along axis 0 mixes the images of a batch, or pins the batch size.
void check_batch_axis_free(const caffe::Net<float>& net, int layer) {
  const caffe::LayerParameter& p = net.layers()[layer]->layer_param();
  const auto& bottoms = net.bottom_vecs()[layer];
  const int bottom_axes = bottoms.empty() ? 4 : bottoms[0]->num_axes();
  if (p.type() == "Reshape") {
    const auto& rp = p.reshape_param();
    const int axis = rp.axis() < 0 ? rp.axis() + bottom_axes + 1 : rp.axis();
    const bool keeps_batch = axis > 0 || (rp.shape().dim_size() > 0 && rp.shape().dim(0) == 0) ||
                             (rp.shape().dim_size() > 1 && rp.shape().dim(0) == -1);
    if (!keeps_batch)
      throw error(describe(net, layer) +
                  " fixes the batch dimension; write 'dim: 0' for axis 0 so the "
                  "net runs at any batch size");
    return;
  }
  const Message& lp = p;
  const auto* reflection = lp.GetReflection();
  std::vector<const FieldDescriptor*> fields;
  reflection->ListFields(lp, &fields);
  for (const FieldDescriptor* f : fields) {
    if (f->type() != FieldDescriptor::TYPE_MESSAGE || f->is_repeated()) continue;
    const Message& sub = reflection->GetMessage(lp, f);
    const FieldDescriptor* axis_field = sub.GetDescriptor()->FindFieldByName("axis");
    if (!axis_field || axis_field->cpp_type() != FieldDescriptor::CPPTYPE_INT32) continue;
    int axis = sub.GetReflection()->GetInt32(sub, axis_field);  // the default when unset
    for (const char* legacy : {"concat_dim", "slice_dim"}) {
      const FieldDescriptor* lf = sub.GetDescriptor()->FindFieldByName(legacy);
      if (lf && !sub.GetReflection()->HasField(sub, axis_field) && sub.GetReflection()->HasField(sub, lf))
        axis = static_cast<int>(sub.GetReflection()->GetUInt32(sub, lf));
    }
    if (axis < 0) axis += bottom_axes;
    if (axis == 0)
      throw error(describe(net, layer) +
                  " works along axis 0, the batch axis: the images of a batch "
                  "would mix, so their saliency maps would not be their own");
  }
  // Reduction's default axis is 0 even when reduction_param is absent.
  if (p.type() == "Reduction" && !p.has_reduction_param())
    throw error(describe(net, layer) + " reduces over axis 0, the batch axis, by default");
}

// Floats per image a layer keeps besides its tops (CAFFE_NOTES section 5), so that the default batch
// size stays within the memory budget: measured on open_nsfw, they are ~40% of the total.
std::size_t hidden_floats_per_image(const caffe::Net<float>& net, int layer) {
  const std::string type = net.layers()[layer]->type();
  const auto& bottoms = net.bottom_vecs()[layer];
  const auto& tops = net.top_vecs()[layer];
  const auto per_image = [](const caffe::Blob<float>* b) {
    return static_cast<std::size_t>(b->count()) / std::max(1, b->shape(0));
  };
  if (type == "BatchNorm") return 2 * per_image(bottoms[0]);  // temp_, x_norm_
  if (type == "Scale" || type == "PReLU")
    return bottoms[0] == tops[0] ? per_image(bottoms[0]) : 0;                              // in-place copies
  if (type == "Pooling" || type == "LRN" || type == "Dropout") return per_image(tops[0]);  // masks, scales
  if (type == "ReLU") return per_image(tops[0]) / 4;  // fastsal's byte mask
  return 0;
}

// Fillers only matter until the weights are shared; constant ones make building the net cheap.
void use_constant_fillers(Message* message) {
  const auto* reflection = message->GetReflection();
  std::vector<const FieldDescriptor*> fields;
  reflection->ListFields(*message, &fields);
  for (const FieldDescriptor* f : fields) {
    if (f->type() != FieldDescriptor::TYPE_MESSAGE) continue;
    const int n = f->is_repeated() ? reflection->FieldSize(*message, f) : 1;
    for (int i = 0; i < n; ++i) {
      Message* sub = f->is_repeated() ? reflection->MutableRepeatedMessage(message, f, i)
                                      : reflection->MutableMessage(message, f);
      if (auto* filler = dynamic_cast<caffe::FillerParameter*>(sub)) {
        filler->Clear();
        filler->set_type("constant");
      } else {
        use_constant_fillers(sub);
      }
    }
  }
}

}  // namespace

int producer_of(const caffe::Net<float>& net, int blob) {
  for (int l = static_cast<int>(net.layers().size()) - 1; l >= 0; --l) {
    const auto& tops = net.top_ids(l);
    if (std::find(tops.begin(), tops.end(), blob) != tops.end()) return l;
  }
  return -1;
}

SaliencyNetPlan plan_saliency_net(const caffe::Net<float>& net, const std::string& input_blob,
                                  const std::string& score_blob) {
  const int num_layers = static_cast<int>(net.layers().size());
  SaliencyNetPlan plan;

  if (!input_blob.empty()) {
    plan.input_blob = input_blob;
  } else if (!net.input_blob_indices().empty()) {
    plan.input_blob = net.blob_names()[net.input_blob_indices()[0]];
  } else {
    throw error("the net has no Input layer; name the blob to differentiate with input=");
  }
  if (!score_blob.empty()) {
    plan.score_blob = score_blob;
  } else if (num_layers > 0 && std::string(net.layers().back()->type()) == "Softmax") {
    plan.score_blob = net.blob_names()[net.bottom_ids(num_layers - 1)[0]];
  } else if (net.output_blob_indices().size() == 1) {
    plan.score_blob = net.blob_names()[net.output_blob_indices()[0]];
  } else {
    throw error("the net does not end in a Softmax and has outputs " +
                join_names(net, net.output_blob_indices()) + "; name the blob of class scores with score=");
  }
  const int input_id = blob_id(net, plan.input_blob, "input");
  const int score_id = blob_id(net, plan.score_blob, "score");

  const int input_layer = producer_of(net, input_id);
  if (input_layer < 0 || std::string(net.layers()[input_layer]->type()) != "Input")
    throw error("input blob '" + plan.input_blob +
                "' is not produced by an Input layer; fastsal feeds "
                "the images into an Input layer's blob");
  const int score_layer = producer_of(net, score_id);
  if (score_layer <= input_layer)
    throw error("score blob '" + plan.score_blob + "' is not computed from input blob '" + plan.input_blob +
                "'");

  // Keep only the layers the score depends on: walk back from its producer, collecting bottoms.
  std::vector<bool> keep(score_layer + 1, false);
  std::set<int> needed = {score_id};
  for (int l = score_layer; l >= 0; --l) {
    const auto& tops = net.top_ids(l);
    if (std::none_of(tops.begin(), tops.end(), [&](int t) { return needed.count(t); })) continue;
    keep[l] = true;
    for (int b : net.bottom_ids(l)) needed.insert(b);
  }
  if (!needed.count(input_id))
    throw error("score blob '" + plan.score_blob + "' does not depend on input blob '" + plan.input_blob +
                "'");

  for (int l = 0; l <= score_layer; ++l) {
    if (!keep[l]) continue;
    if (l == input_layer) {
      for (int t : net.top_ids(l))
        if (t != input_id && needed.count(t))
          throw error("score blob '" + plan.score_blob + "' also depends on input '" + net.blob_names()[t] +
                      "'; fastsal differentiates with respect to one input only");
      continue;
    }
    if (net.bottom_ids(l).empty())
      throw error("score blob '" + plan.score_blob + "' also depends on " + describe(net, l) +
                  ", which has no inputs; fastsal differentiates with respect to one input only");
    check_differentiable(net, l);
    check_batch_axis_free(net, l);
  }

  const caffe::Blob<float>& input = *net.blobs()[input_id];
  const caffe::Blob<float>& score = *net.blobs()[score_id];
  if (input.num_axes() != 4)
    throw error("input blob '" + plan.input_blob + "' has shape " + input.shape_string() +
                "; fastsal computes maps for image inputs of shape (N, C, H, W)");
  if (score.num_axes() < 1 || score.shape(0) != input.shape(0))
    throw error("score blob '" + plan.score_blob + "' has shape " + score.shape_string() +
                ", whose first axis is not the batch axis of input blob '" + plan.input_blob + "' " +
                input.shape_string());
  plan.image_shape.assign(input.shape().begin() + 1, input.shape().end());
  plan.num_classes = score.count(1);

  std::set<int> kept_blobs;
  for (int l = 0; l <= score_layer; ++l) {
    if (!keep[l]) continue;
    kept_blobs.insert(net.top_ids(l).begin(), net.top_ids(l).end());
    plan.bytes_per_image += sizeof(float) * hidden_floats_per_image(net, l);
  }
  for (int b : kept_blobs)
    plan.bytes_per_image += 2 * sizeof(float) * static_cast<std::size_t>(net.blobs()[b]->count()) /
                            std::max(1, net.blobs()[b]->shape(0));

  caffe::NetParameter& param = plan.param;
  param.set_name(net.name());
  param.set_force_backward(true);
  param.mutable_state()->set_phase(caffe::TEST);  // TEST: global BatchNorm statistics, no dropout
  for (int l = 0; l <= score_layer; ++l) {
    if (!keep[l]) continue;
    caffe::LayerParameter* layer = param.add_layer();
    *layer = net.layers()[l]->layer_param();
    layer->clear_blobs();
    layer->clear_include();
    layer->clear_exclude();
    layer->set_phase(caffe::TEST);
    if (l == input_layer) {  // the one input, its shape at batch 1 for now
      layer->clear_top();
      layer->add_top(plan.input_blob);
      layer->mutable_input_param()->clear_shape();
      caffe::BlobShape* shape = layer->mutable_input_param()->add_shape();
      for (int d : input.shape()) shape->add_dim(d);
    }
    use_constant_fillers(layer);
  }
  return plan;
}

caffe::NetParameter SaliencyNetPlan::with_batch_size(int batch_size) const {
  caffe::NetParameter sized = param;
  for (auto& layer : *sized.mutable_layer())
    if (layer.type() == "Input") layer.mutable_input_param()->mutable_shape(0)->set_dim(0, batch_size);
  return sized;
}

}  // namespace fastsal
