// Reductions over colour channels, the last step of a map: abs-max (Simonyan's saliency) or a plain sum
// (Captum's visualisation), and the other per-element math of the backward (seeds, ReLU rules). All of
// it is shared by the threaded CPU loops and the CUDA kernels, so CPU tests cover both.
#pragma once

#include <cmath>
#include <cstddef>

#if defined(__CUDACC__)
#define FASTSAL_HOST_DEVICE __host__ __device__
#else
#define FASTSAL_HOST_DEVICE
#endif

namespace fastsal {

// Gradients are (images, channels, pixels) in Caffe's NCHW order. The map of image i lands at
// out + i * out_image_stride, so a batch of maps goes straight into its (n, k) slots of the result.
enum class ChannelReduction { kAbsMax, kSum };

struct ChannelLayout {
  int images;
  int channels;
  int pixels;
  std::ptrdiff_t out_image_stride;

  FASTSAL_HOST_DEVICE std::ptrdiff_t size() const { return static_cast<std::ptrdiff_t>(images) * pixels; }
  FASTSAL_HOST_DEVICE std::ptrdiff_t out_index(std::ptrdiff_t i) const {
    return (i / pixels) * out_image_stride + i % pixels;
  }
};

// max_c |gradient[image, c, pixel]| (NaN propagates like NumPy's max) or sum_c gradient[image, c, pixel],
// for output element i in [0, layout.size()).
FASTSAL_HOST_DEVICE inline float channel_reduce_at(const float* gradient, const ChannelLayout& layout,
                                                   ChannelReduction op, std::ptrdiff_t i) {
  const std::ptrdiff_t image = i / layout.pixels, pixel = i % layout.pixels;
  const float* g = gradient + image * layout.channels * layout.pixels + pixel;
  if (op == ChannelReduction::kSum) {
    float sum = 0.f;
    for (int c = 0; c < layout.channels; ++c) sum += g[static_cast<std::ptrdiff_t>(c) * layout.pixels];
    return sum;
  }
  float result = fabsf(g[0]);
  for (int c = 1; c < layout.channels; ++c) {
    const float a = fabsf(g[static_cast<std::ptrdiff_t>(c) * layout.pixels]);
    if ((a > result || a != a) && result == result) result = a;  // x != x: NaN, on host and device
  }
  return result;
}

// Where the one-hot seed of score row r goes: its class is classes[r * classes_stride + class_offset]
// (one backward per class: stride K, offset k; (image, class) pairs in the batch: stride 1, offset 0).
FASTSAL_HOST_DEVICE inline std::ptrdiff_t seed_index(int row, const int* classes, int num_classes,
                                                     int classes_stride, int class_offset) {
  return static_cast<std::ptrdiff_t>(row) * num_classes +
         classes[static_cast<std::ptrdiff_t>(row) * classes_stride + class_offset];
}

// An attribution rule's backward of one ReLU element, as Captum's hooks on nn.ReLU compute it: guided
// backprop g * (x > 0) * (g > 0), deconvnet g * (g > 0). x may be the ReLU's output (in place): the
// same sign test.
FASTSAL_HOST_DEVICE inline float relu_rule_backward(float g, float x, bool guided) {
  return (g > 0.f && (!guided || x > 0.f)) ? g : 0.f;
}

// On the host, threaded (OpenMP); gradient and out are host memory.
void channel_reduce_cpu(const float* gradient, const ChannelLayout& layout, ChannelReduction op, float* out);

}  // namespace fastsal
