#include "layers/pooling_layer.hpp"

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <vector>

#include "layers/lrp_rule.hpp"

namespace fastsal::layers {

namespace {

struct PoolingWindows {
  int height, width, pooled_h, pooled_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
};

// Caffe's max pooling forward on one plane, comparison for comparison: the first maximum in a window
// wins, and a window of nothing above -FLT_MAX keeps index -1 (the return value says whether one did).
// A whole output row at a time, one window offset (h, kw) after another: each window still sees its
// elements in Caffe's order (h, then w), and the loop over the row vectorises. Its strided loads need
// AVX2 or AVX-512 for that (on SSE2 alone it ran 2x slower than a window at a time, and 1.75x faster
// with AVX-512: pool1 of open_nsfw, 8 images), hence the clones, one picked when the library loads.
bool max_pool_plane(const float* in, float* out, int* index, const PoolingWindows& g)
    __attribute__((target_clones("avx512f", "avx2", "default")));
bool max_pool_plane(const float* in, float* out, int* index, const PoolingWindows& g) {
  bool empty = false;
  for (int ph = 0; ph < g.pooled_h; ++ph) {
    const int hstart = std::max(ph * g.stride_h - g.pad_h, 0);
    const int hend = std::min(ph * g.stride_h - g.pad_h + g.kernel_h, g.height);
    float* best = out + ph * g.pooled_w;
    int* best_index = index + ph * g.pooled_w;
    std::fill_n(best, g.pooled_w, -FLT_MAX);
    std::fill_n(best_index, g.pooled_w, -1);
    for (int h = hstart; h < hend; ++h)
      for (int kw = 0; kw < g.kernel_w; ++kw) {
        const int offset = kw - g.pad_w;  // w = pw * stride_w + offset, inside [0, width)
        if (offset >= g.width) break;     // the padding on the right (a kernel wider than the image)
        const int first = offset >= 0 ? 0 : (-offset + g.stride_w - 1) / g.stride_w;
        const int last = std::min(g.pooled_w - 1, (g.width - 1 - offset) / g.stride_w);
        const int stride = g.stride_w, base = h * g.width + offset;
        const float* row = in + base;
#pragma omp simd
        for (int pw = first; pw <= last; ++pw) {
          const float x = row[pw * stride];
          const bool above = x > best[pw];  // branch-free: which element wins is data
          best[pw] = above ? x : best[pw];
          best_index[pw] = above ? base + pw * stride : best_index[pw];
        }
      }
    for (int pw = 0; pw < g.pooled_w; ++pw) empty |= best_index[pw] < 0;
  }
  return empty;
}

}  // namespace

void PoolingLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                               const std::vector<caffe::Blob<float>*>& top) {
  overflowed_row_ = -1;
  if (is_max() && top.size() == 1) return max_forward(*bottom[0], *top[0]);
  caffe::PoolingLayer<float>::Forward_cpu(bottom, top);
  if (!is_max()) return;
  const std::int64_t per_row = top[0]->count(1);
  const float* mask = top[1]->cpu_data();
  for (int n = 0; n < top[0]->shape(0) && overflowed_row_ < 0; ++n)
    if (std::any_of(mask + n * per_row, mask + (n + 1) * per_row, [](float i) { return i < 0; }))
      overflowed_row_ = n;
}

void PoolingLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                const std::vector<bool>& propagate_down,
                                const std::vector<caffe::Blob<float>*>& bottom) {
  if (!is_max()) return caffe::PoolingLayer<float>::Backward_cpu(top, propagate_down, bottom);
  if (!propagate_down[0]) return;
  const float* top_diff = top[0]->cpu_diff();
  float* bottom_diff = bottom[0]->mutable_cpu_diff();
  const int* mask = top.size() > 1 ? nullptr : this->max_idx_.cpu_data();
  const float* top_mask = top.size() > 1 ? top[1]->cpu_data() : nullptr;
  const std::int64_t planes = std::int64_t(top[0]->shape(0)) * this->channels_;
  const std::int64_t top_plane = std::int64_t(this->pooled_height_) * this->pooled_width_;
  const std::int64_t bottom_plane = std::int64_t(this->height_) * this->width_;
#pragma omp parallel for schedule(static) if (planes * bottom_plane >= (1 << 16))
  for (std::int64_t p = 0; p < planes; ++p) {
    float* diff = bottom_diff + p * bottom_plane;
    std::fill_n(diff, bottom_plane, 0.f);
    for (std::int64_t i = p * top_plane; i < (p + 1) * top_plane; ++i) {
      const int index = mask ? mask[i] : static_cast<int>(top_mask[i]);
      if (index >= 0) diff[index] += top_diff[i];
    }
  }
}

void PoolingLayer::max_forward(const caffe::Blob<float>& bottom, caffe::Blob<float>& top) {
  const float* bottom_data = bottom.cpu_data();
  float* top_data = top.mutable_cpu_data();
  int* mask = this->max_idx_.mutable_cpu_data();
  const std::int64_t planes = std::int64_t(top.shape(0)) * this->channels_;
  const PoolingWindows windows{this->height_,   this->width_,    this->pooled_height_, this->pooled_width_,
                               this->kernel_h_, this->kernel_w_, this->stride_h_,      this->stride_w_,
                               this->pad_h_,    this->pad_w_};
  const std::int64_t top_plane = std::int64_t(windows.pooled_h) * windows.pooled_w,
                     bottom_plane = std::int64_t(windows.height) * windows.width;
  empty_window_.assign(planes, 0);
#pragma omp parallel for schedule(static) if (planes * bottom_plane >= (1 << 16))
  for (std::int64_t p = 0; p < planes; ++p)
    empty_window_[p] = max_pool_plane(bottom_data + p * bottom_plane, top_data + p * top_plane,
                                      mask + p * top_plane, windows);
  const auto first = std::find(empty_window_.begin(), empty_window_.end(), 1);
  if (first != empty_window_.end()) overflowed_row_ = int((first - empty_window_.begin()) / this->channels_);
}

void RulePoolingLayer::Forward_cpu(const std::vector<caffe::Blob<float>*>& bottom,
                                   const std::vector<caffe::Blob<float>*>& top) {
  PoolingLayer::Forward_cpu(bottom, top);
  if (!average()) return;
  const float* y = top[0]->cpu_data();
  denominator_.resize(top[0]->count());
  for (std::size_t i = 0; i < denominator_.size(); ++i) denominator_[i] = stabilize(y[i], stabilizer_);
}

void RulePoolingLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                                    const std::vector<bool>& propagate_down,
                                    const std::vector<caffe::Blob<float>*>& bottom) {
  if (!average() || !propagate_down[0]) return PoolingLayer::Backward_cpu(top, propagate_down, bottom);
  float* r = top[0]->mutable_cpu_diff();  // becomes R / z: nothing reads this diff after this layer
  for (std::size_t i = 0; i < denominator_.size(); ++i) r[i] /= denominator_[i];
  PoolingLayer::Backward_cpu(top, propagate_down, bottom);
  const float* x = bottom[0]->cpu_data();
  float* out = bottom[0]->mutable_cpu_diff();
  const std::int64_t count = bottom[0]->count();
  for (std::int64_t i = 0; i < count; ++i) out[i] *= x[i];
}

}  // namespace fastsal::layers
