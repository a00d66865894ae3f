#include "class_head.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <string>

#include "channel_reduce.hpp"
#include "inner_product.hpp"

namespace fastsal {

namespace {

bool is_head_layer(const caffe::Layer<float>& layer, caffe::Phase phase) {
  const std::string type = layer.type();
  const caffe::LayerParameter& p = layer.layer_param();
  if (type == "InnerProduct")
    return p.inner_product_param().axis() == 1 && !p.inner_product_param().transpose();
  return type == "ReLU" || (type == "Dropout" && phase == caffe::TEST);
}

}  // namespace

ClassHead::ClassHead(const caffe::Net<float>& net, int score_layer, int stop_layer, ReLURule relu_rule)
    : net_(net), relu_rule_(relu_rule) {
  const auto& bottoms = net.bottom_vecs();
  const auto& tops = net.top_vecs();
  const caffe::Blob<float>* current = nullptr;  // the blob whose diff the layers above produce
  for (int l = score_layer; l >= std::max(stop_layer, 1); --l) {
    const caffe::Layer<float>& layer = *net.layers()[l];
    if (bottoms[l].size() != 1 || tops[l].size() != 1 || !is_head_layer(layer, net.phase())) break;
    if (current && tops[l][0] != current) break;  // not a chain
    // Every other reader of the bottom is in the head already or rewrites it in place below (its
    // backward then runs after the head's); else the head's diff would miss that reader's share.
    caffe::Blob<float>* bottom = bottoms[l][0];
    bool shared = false;
    for (int j = 0; j < static_cast<int>(bottoms.size()); ++j) {
      const bool reads = std::find(bottoms[j].begin(), bottoms[j].end(), bottom) != bottoms[j].end();
      const bool in_place_below = j < l && std::find(tops[j].begin(), tops[j].end(), bottom) != tops[j].end();
      if (j != l && reads && !in_place_below && std::find(layers_.begin(), layers_.end(), j) == layers_.end())
        shared = true;
    }
    if (shared) break;
    layers_.push_back(l);
    current = bottom;
    widest_ = std::max({widest_, std::size_t(bottom->count(1)), std::size_t(tops[l][0]->count(1))});
  }
  // A head without an InnerProduct saves nothing: leave such nets to the per-class backward.
  const bool has_product = std::any_of(layers_.begin(), layers_.end(), [&](int l) {
    return std::string(net.layers()[l]->type()) == "InnerProduct";
  });
  if (!has_product) layers_.clear();
  if (!layers_.empty()) bottom_ = bottoms[first_layer()][0];
}

int ClassHead::passes_within(int rows, std::size_t bytes) const {
  return static_cast<int>(
      std::max<std::size_t>(1, bytes / (2 * std::size_t(rows) * widest_ * sizeof(float))));
}

const float* ClassHead::backward(int rows, const int* row_classes, int passes, int first_pass, int count,
                                 std::vector<double>* layer_seconds) {
  const std::int64_t m = std::int64_t(count) * rows;  // GEMM rows: (pass, row), pass-major
  const std::size_t half = std::size_t(m) * widest_;
  if (buffer_.size() < 2 * half) buffer_.resize(2 * half);
  float* in = buffer_.data();
  float* out = in + half;
  // One-hot seeds at the score, each pass's rows where the engine's per-class backward puts them.
  const int num_classes = net_.top_vecs()[layers_.front()][0]->count(1);
  std::fill_n(in, std::size_t(m) * num_classes, 0.f);
  for (int p = 0; p < count; ++p)
    for (int r = 0; r < rows; ++r)
      in[std::size_t(p) * rows * num_classes +
         seed_index(r, row_classes, num_classes, passes, first_pass + p)] = 1.f;

  for (int l : layers_) {
    const auto start = std::chrono::steady_clock::now();
    caffe::Layer<float>& layer = *net_.layers()[l];  // blobs() has no const overload
    const caffe::Blob<float>& bottom = *net_.bottom_vecs()[l][0];
    const std::string type = layer.type();
    const std::int64_t width = bottom.count(1);
    if (type == "InnerProduct") {  // Caffe's data backward, top_diff x W, with K x rows rows
      const int outputs = net_.top_vecs()[l][0]->count(1);
      inner_product_backward(static_cast<int>(m), static_cast<int>(width), outputs, in,
                             layer.blobs()[0]->cpu_data(), out);
      std::swap(in, out);
    } else if (type == "ReLU") {  // in place on the buffer; each (pass, row) reads its row's forward values
      const float slope = layer.layer_param().relu_param().negative_slope();
      const bool rule = slope == 0.f && relu_rule_ != ReLURule::kGradient;
      const bool guided = relu_rule_ == ReLURule::kGuided;
      const float* x = bottom.cpu_data();  // in place, this is max(x, 0): the same sign test
#pragma omp parallel for schedule(static) if (m * width >= (1 << 16))
      for (std::int64_t i = 0; i < m; ++i) {
        const float* xi = x + (i % rows) * width;
        float* g = in + i * width;
        if (rule) {
          for (std::int64_t j = 0; j < width; ++j) g[j] = relu_rule_backward(g[j], xi[j], guided);
        } else {  // Caffe's expression, so Inf and NaN propagate as in Caffe
          for (std::int64_t j = 0; j < width; ++j) g[j] *= (xi[j] > 0.f) + slope * (xi[j] <= 0.f);
        }
      }
    }  // Dropout at test time passes the diff through
    if (layer_seconds)
      (*layer_seconds)[l] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return in;
}

}  // namespace fastsal
