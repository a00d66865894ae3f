#include "layers/split_layer.hpp"

#include <cstddef>
#include <cstdint>
#include <vector>

#include "layers/parallel.hpp"

namespace fastsal::layers {

void SplitLayer::Backward_cpu(const std::vector<caffe::Blob<float>*>& top,
                              const std::vector<bool>& propagate_down,
                              const std::vector<caffe::Blob<float>*>& bottom) {
  if (!propagate_down[0] || top.size() < 2)
    return caffe::SplitLayer<float>::Backward_cpu(top, propagate_down, bottom);
  std::vector<const float*> diffs;
  for (const caffe::Blob<float>* blob : top) diffs.push_back(blob->cpu_diff());
  float* out = bottom[0]->mutable_cpu_diff();
  in_chunks(bottom[0]->count(), [&](std::int64_t begin, std::int64_t end) {
    const float *a = diffs[0], *b = diffs[1];
#pragma omp simd
    for (std::int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
    for (std::size_t t = 2; t < diffs.size(); ++t) {
      const float* c = diffs[t];
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) out[i] += c[i];
    }
  });
}

}  // namespace fastsal::layers
