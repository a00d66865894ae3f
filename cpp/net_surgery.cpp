#include "net_surgery.hpp"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
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

// How alike two names are, as difflib's ratio: 2 * (characters in common, in order) / (both lengths);
// case-insensitive, so 'FC7' finds 'fc7'.
double likeness(const std::string& a, const std::string& b) {
  if (a.empty() && b.empty()) return 1.0;
  std::vector<int> row(b.size() + 1, 0);  // the longest common subsequence, one row at a time
  for (char x : a) {
    int diagonal = 0;
    for (std::size_t j = 0; j < b.size(); ++j) {
      const int above = row[j + 1];
      row[j + 1] =
          std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(b[j]))
              ? diagonal + 1
              : std::max(row[j + 1], row[j]);
      diagonal = above;
    }
  }
  return 2.0 * row.back() / static_cast<double>(a.size() + b.size());
}

// Up to three names of `known` most like `name` (difflib.get_close_matches' cutoff, 0.6), best first.
std::vector<std::string> close_matches(const std::string& name, const std::vector<std::string>& known) {
  std::vector<std::pair<double, std::size_t>> scored;
  for (std::size_t i = 0; i < known.size(); ++i)
    if (const double score = likeness(name, known[i]); score >= 0.6) scored.emplace_back(-score, i);
  std::stable_sort(scored.begin(), scored.end());
  std::vector<std::string> names;
  for (std::size_t i = 0; i < std::min<std::size_t>(3, scored.size()); ++i)
    names.push_back(known[scored[i].second]);
  return names;
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

// A blob's floats per batch row.
std::size_t per_image(const caffe::Blob<float>* blob) {
  return static_cast<std::size_t>(blob->count()) / std::max(1, blob->shape(0));
}

// Floats per image a layer keeps besides its tops (docs/caffe_internals.md section 5), so that the
// default batch size stays within the memory budget. `fast`: fastsal's CPU layers (cpp/layers/),
// whose test-time BatchNorm and single-input Scale keep nothing and whose ReLU keeps a byte mask.
std::size_t hidden_floats_per_image(const caffe::Net<float>& net, int layer, bool fast) {
  const caffe::LayerParameter& p = net.layers()[layer]->layer_param();
  const std::string& type = p.type();
  const auto& bottoms = net.bottom_vecs()[layer];
  const auto& tops = net.top_vecs()[layer];
  const bool test = net.phase() == caffe::TEST;
  if (type == "BatchNorm") {
    const auto& bn = p.batch_norm_param();
    const bool global = bn.has_use_global_stats() ? bn.use_global_stats() : test;  // Caffe's default
    return fast && global ? 0 : 2 * per_image(bottoms[0]);                         // temp_, x_norm_
  }
  if (type == "Scale" && fast && bottoms.size() == 1) return 0;
  if (type == "Scale" || type == "PReLU")
    return bottoms[0] == tops[0] ? per_image(bottoms[0]) : 0;         // in-place copies
  if (type == "Dropout") return test ? 0 : per_image(tops[0]);        // rand_vec_, touched in training only
  if (type == "Pooling" || type == "LRN") return per_image(tops[0]);  // masks, scales
  if (type == "ReLU") return fast ? per_image(tops[0]) / 4 : 0;       // fastsal's byte mask
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

std::string shape_of(const std::vector<int>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

bool writes(const caffe::Net<float>& net, int layer, int blob) {
  const auto& tops = net.top_ids(layer);
  return std::find(tops.begin(), tops.end(), blob) != tops.end();
}

bool in_place(const caffe::Net<float>& net, int layer, int blob) {
  const auto& bottoms = net.bottom_ids(layer);
  return writes(net, layer, blob) && std::find(bottoms.begin(), bottoms.end(), blob) != bottoms.end();
}

// Caffe CHECK-aborts on a negative blob size and on reading an empty one: before building the net at
// another image size, follow the spatial size through the kept layers with Caffe's own formulas
// (conv_layer.cpp compute_output_shape, pooling_layer.cpp Reshape) and refuse any size below 1.
void check_spatial_sizes(const caffe::Net<float>& net, const std::vector<bool>& keep, int input_id,
                         const std::vector<int>& image_shape) {
  std::map<int, std::pair<int, int>> size = {{input_id, {image_shape[1], image_shape[2]}}};
  for (int l = 0; l < static_cast<int>(keep.size()); ++l) {
    if (!keep[l] || net.bottom_ids(l).empty()) continue;
    const auto found = size.find(net.bottom_ids(l)[0]);
    if (found == size.end()) continue;
    const caffe::LayerParameter& p = net.layers()[l]->layer_param();
    auto [h, w] = found->second;
    if (p.type() == "Convolution" || p.type() == "Deconvolution") {
      const auto& c = p.convolution_param();
      // One value for both axes, or one per axis (BaseConvolutionLayer::LayerSetUp).
      const auto pick = [](const auto& values, int axis, int fallback) {
        return values.size() == 1 ? values.Get(0) : values.size() > axis ? values.Get(axis) : fallback;
      };
      const int kh = c.has_kernel_h() ? c.kernel_h() : pick(c.kernel_size(), 0, 1);
      const int kw = c.has_kernel_w() ? c.kernel_w() : pick(c.kernel_size(), 1, 1);
      const int sh = c.has_stride_h() ? c.stride_h() : pick(c.stride(), 0, 1);
      const int sw = c.has_stride_w() ? c.stride_w() : pick(c.stride(), 1, 1);
      const int ph = c.has_pad_h() ? c.pad_h() : pick(c.pad(), 0, 0);
      const int pw = c.has_pad_w() ? c.pad_w() : pick(c.pad(), 1, 0);
      const int dh = pick(c.dilation(), 0, 1), dw = pick(c.dilation(), 1, 1);
      if (p.type() == "Deconvolution") {
        h = sh * (h - 1) + dh * (kh - 1) + 1 - 2 * ph;
        w = sw * (w - 1) + dw * (kw - 1) + 1 - 2 * pw;
      } else {
        h = (h + 2 * ph - (dh * (kh - 1) + 1)) / sh + 1;
        w = (w + 2 * pw - (dw * (kw - 1) + 1)) / sw + 1;
      }
    } else if (p.type() == "Pooling") {
      const auto& q = p.pooling_param();
      if (q.global_pooling()) {
        h = w = 1;
      } else {
        const int kh = q.has_kernel_h() ? q.kernel_h() : q.kernel_size();
        const int kw = q.has_kernel_w() ? q.kernel_w() : q.kernel_size();
        const int sh = q.has_stride_h() ? q.stride_h() : q.stride();
        const int sw = q.has_stride_w() ? q.stride_w() : q.stride();
        const int ph = q.has_pad_h() ? q.pad_h() : q.pad();
        const int pw = q.has_pad_w() ? q.pad_w() : q.pad();
        const int ih = h, iw = w;
        h = static_cast<int>(std::ceil(static_cast<float>(ih + 2 * ph - kh) / sh)) + 1;
        w = static_cast<int>(std::ceil(static_cast<float>(iw + 2 * pw - kw) / sw)) + 1;
        if ((ph || pw) && (h - 1) * sh >= ih + ph) --h;  // the last window must start inside the image
        if ((ph || pw) && (w - 1) * sw >= iw + pw) --w;
      }
    } else if (p.type() == "Crop" || p.type() == "Reshape" || p.type() == "InnerProduct" ||
               p.type() == "Flatten") {
      continue;  // no longer an image-shaped size to follow
    }
    if (h < 1 || w < 1)
      throw error("images of " + std::to_string(image_shape[1]) + "x" + std::to_string(image_shape[2]) +
                  " are too small for " + describe(net, l) + ": its output would be " + std::to_string(h) +
                  "x" + std::to_string(w));
    for (int t : net.top_ids(l)) size[t] = {h, w};
  }
}

}  // namespace

std::string default_score_blob(const caffe::Net<float>& net) {
  const auto& outputs = net.output_blob_indices();
  std::vector<int> heads;
  for (int l = 0; l < static_cast<int>(net.layers().size()); ++l)
    if (std::string(net.layers()[l]->type()) == "Softmax" && !net.top_ids(l).empty() &&
        std::find(outputs.begin(), outputs.end(), net.top_ids(l)[0]) != outputs.end())
      heads.push_back(l);
  if (heads.size() == 1) return net.blob_names()[net.bottom_ids(heads[0])[0]];
  if (heads.size() > 1) {
    std::string names;
    for (int l : heads)
      names += (names.empty() ? "'" : ", '") + net.blob_names()[net.bottom_ids(l)[0]] + "' (under " +
               describe(net, l) + ")";
    throw error("the net has " + std::to_string(heads.size()) + " Softmax outputs, on " + names +
                "; name the blob of class scores with score=");
  }
  if (outputs.size() == 1) return net.blob_names()[outputs[0]];
  throw error("the net has no Softmax output and has outputs " + join_names(net, outputs) +
              "; name the blob of class scores with score=");
}

int find_blob(const caffe::Net<float>& net, const std::string& name, const std::string& role) {
  const auto& names = net.blob_names();
  const auto it = std::find(names.begin(), names.end(), name);
  if (it != names.end()) return static_cast<int>(it - names.begin());
  // A real net has hundreds of blobs: name the likely ones, not all of them on one line.
  const auto like = close_matches(name, names);
  std::string guess;
  for (std::size_t i = 0; i < like.size(); ++i)
    guess += (i == 0 ? "'" : i + 1 == like.size() ? " or '" : ", '") + like[i] + "'";
  throw error("unknown " + role + " blob '" + name + "'; " +
              (like.empty() ? "no blob has a name like it" : "did you mean " + guess + "?") +
              " (net.blobs lists all " + std::to_string(names.size()) + " blobs)");
}

int producer_of(const caffe::Net<float>& net, int blob, int before) {
  if (before < 0) before = static_cast<int>(net.layers().size());
  for (int l = before - 1; l >= 0; --l)
    if (writes(net, l, blob)) return l;
  return -1;
}

SaliencyNetPlan plan_saliency_net(const caffe::Net<float>& net, const std::string& input_blob,
                                  const std::string& score_blob, const std::string& gradient_blob,
                                  const std::vector<int>& image_shape) {
  SaliencyNetPlan plan;
  if (!input_blob.empty()) {
    plan.input_blob = input_blob;
  } else if (!net.input_blob_indices().empty()) {
    plan.input_blob = net.blob_names()[net.input_blob_indices()[0]];
  } else {
    throw error("the net has no Input layer; name the blob to differentiate with input=");
  }
  plan.score_blob = score_blob.empty() ? default_score_blob(net) : score_blob;
  const int input_id = find_blob(net, plan.input_blob, "input");
  const int score_id = find_blob(net, plan.score_blob, "score");

  // The input is the Input layer's top; layers may then rewrite it in place (a Power scaling it, say):
  // they are part of the net being differentiated, as in the seed recipe.
  int input_layer = 0;
  while (input_layer < static_cast<int>(net.layers().size()) && !writes(net, input_layer, input_id))
    ++input_layer;
  if (input_layer == static_cast<int>(net.layers().size()) ||
      std::string(net.layers()[input_layer]->type()) != "Input")
    throw error("input blob '" + plan.input_blob +
                "' is not produced by an Input layer; fastsal feeds "
                "the images into an Input layer's blob");
  // The score is the blob as pycaffe shows it after the forward pass, but a Softmax applied in place is
  // never part of it: probabilities are not the class scores (the default takes the Softmax's input).
  int score_layer = producer_of(net, score_id);
  while (score_layer > input_layer && std::string(net.layers()[score_layer]->type()) == "Softmax" &&
         in_place(net, score_layer, score_id))
    score_layer = producer_of(net, score_id, score_layer);
  if (score_layer <= input_layer)
    throw error("score blob '" + plan.score_blob + "' is not computed from input blob '" + plan.input_blob +
                "'");
  plan.score_layer = net.layer_names()[score_layer];
  for (int l = score_layer; l > input_layer && in_place(net, l, score_id); l = producer_of(net, score_id, l))
    plan.score_rewrites.insert(plan.score_rewrites.begin(), describe(net, l));

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
  // The gradient is taken at the input (through layers rewriting it in place), or at a blob between
  // input and score as its final value shows it: the backward stops before that blob's last writer.
  plan.gradient_blob = gradient_blob.empty() ? plan.input_blob : gradient_blob;
  int gradient_layer = input_layer;
  if (plan.gradient_blob != plan.input_blob) {
    const int id = find_blob(net, plan.gradient_blob, "layer");
    gradient_layer = producer_of(net, id, score_layer + 1);
    if (id == score_id)
      throw error("layer blob '" + plan.gradient_blob +
                  "' is the score blob itself; Grad-CAM needs a blob before it, between input blob '" +
                  plan.input_blob + "' and score blob '" + plan.score_blob + "'");
    if (!needed.count(id) || gradient_layer <= input_layer)
      throw error("blob '" + plan.gradient_blob + "' is not between input blob '" + plan.input_blob +
                  "' and score blob '" + plan.score_blob + "'");
    plan.gradient_layer = net.layer_names()[gradient_layer];
  }

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
    if (l > gradient_layer) check_differentiable(net, l);  // only the backward's layers need a gradient
    check_batch_axis_free(net, l);
  }

  const caffe::Blob<float>& input = *net.blobs()[input_id];
  if (input.num_axes() != 4)
    throw error("input blob '" + plan.input_blob + "' has shape " + input.shape_string() +
                "; fastsal computes maps for image inputs of shape (N, C, H, W)");
  plan.image_shape.assign(input.shape().begin() + 1, input.shape().end());
  plan.user_image_shape = plan.image_shape;
  if (!image_shape.empty()) {  // another image size for the same layers (dream's octaves)
    if (image_shape.size() != 3 || image_shape[0] != plan.image_shape[0])
      throw error("image_shape must be (C, H, W) with the input's " + std::to_string(plan.image_shape[0]) +
                  " channels");
    plan.image_shape = image_shape;
  }
  // Whatever the size came from: the input blob reshaped without net.reshape() is not checked by Caffe.
  check_spatial_sizes(net, keep, input_id, plan.image_shape);
  for (int d : plan.image_shape)
    if (d < 1)
      throw error("input blob '" + plan.input_blob + "' has shape " + input.shape_string() +
                  "; every image dimension must be at least 1");

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
    if (l == input_layer) {  // the one input, at batch 1: the engine resizes it for each batch
      layer->clear_top();
      layer->add_top(plan.input_blob);
      layer->mutable_input_param()->clear_shape();
      caffe::BlobShape* shape = layer->mutable_input_param()->add_shape();
      shape->add_dim(1);
      for (int d : plan.image_shape) shape->add_dim(d);
    }
    use_constant_fillers(layer);
  }
  return plan;
}

void check_weights_fit(const caffe::Net<float>& internal, const caffe::Net<float>& user) {
  const auto& user_names = user.layer_names();
  for (std::size_t i = 0; i < internal.layers().size(); ++i) {
    const auto it = std::find(user_names.begin(), user_names.end(), internal.layer_names()[i]);
    if (it == user_names.end()) continue;
    const auto& mine = internal.layers()[i]->blobs();
    const auto& theirs = user.layers()[it - user_names.begin()]->blobs();
    bool fits = mine.size() == theirs.size();
    for (std::size_t j = 0; fits && j < mine.size(); ++j) fits = mine[j]->shape() == theirs[j]->shape();
    if (fits) continue;
    const auto shapes = [](const std::vector<boost::shared_ptr<caffe::Blob<float>>>& blobs) {
      std::string text;
      for (const auto& b : blobs) text += (text.empty() ? "" : " and ") + shape_of(b->shape());
      return text.empty() ? std::string("none") : text;
    };
    const caffe::Blob<float>& input = *internal.blobs()[internal.input_blob_indices()[0]];
    throw error("images of shape " + shape_of({input.shape().begin() + 1, input.shape().end()}) + " need " +
                describe(internal, static_cast<int>(i)) + " to hold weights " + shapes(mine) +
                ", but the net holds " + shapes(theirs) +
                ": the net's input blob was reshaped to a size its weights do not fit");
  }
}

std::size_t bytes_per_image(const caffe::Net<float>& net, bool fast_layers, bool diffs) {
  std::size_t floats = 0;
  for (const auto& blob : net.blobs()) floats += (diffs ? 2 : 1) * per_image(blob.get());
  for (int l = 0; l < static_cast<int>(net.layers().size()); ++l) {
    floats += hidden_floats_per_image(net, l, fast_layers);
    if (net.layers()[l]->type() == "Split")  // its tops share the bottom's data (SplitLayer::Reshape)
      for (const caffe::Blob<float>* top : net.top_vecs()[l]) floats -= per_image(top);
  }
  return floats * sizeof(float);
}

}  // namespace fastsal
