#include "inner_product.hpp"

#include <omp.h>

#include <algorithm>
#include <caffe/util/math_functions.hpp>
#include <cstdint>
#include <vector>

#include "gemm.hpp"

namespace fastsal {

// Built for the baseline x86-64 ISA, the loops would not use AVX: one copy per ISA, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTSAL_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTSAL_VECTOR_CLONES
#endif

namespace {
// Up to this many rows W is streamed (measured on fc6 against OpenBLAS); above, a GEMM reuses it better.
constexpr int kStreamRows = 32, kStreamRowsForward = 16;
constexpr int kWeightRows = 8;       // W rows read side by side (8 sequential streams)
constexpr std::int64_t kTile = 512;  // columns per step: 8 W rows of it (16 KB) stay in L1 for all m rows

// d[j] += sum_i a[i] w[i][j] for j in [0, width), i in [0, R): R a constant, so it unrolls.
template <int R>
void accumulate(const float* a, const float* const* w, std::int64_t offset, float* d, std::int64_t width) {
#pragma omp simd
  for (std::int64_t j = 0; j < width; ++j) {
    float sum = d[j];
    for (int i = 0; i < R; ++i) sum += a[i] * w[i][offset + j];
    d[j] = sum;
  }
}
}  // namespace

FASTSAL_VECTOR_CLONES
void inner_product_backward(int m, int inputs, int outputs, const float* top_diff, const float* weights,
                            float* bottom_diff) {
  if (m > kStreamRows) {
    gemm(false, false, m, inputs, outputs, 1.f, top_diff, weights, 0.f, bottom_diff);
    return;
  }
  // Only the W rows some top_diff row needs: behind a ReLU many units are off for the few rows here
  // (VGG-16's fc6 at one image: half of its 411 MB), and above the one-hot seeds all rows but the K
  // classes'. A skipped row adds only exact zeros, unless it holds an Inf or NaN weight: Caffe then
  // gives NaN (0 x Inf), this the zero gradient of the unit its ReLU turned off.
  std::vector<int> active;
  for (int o = 0; o < outputs; ++o)
    for (int r = 0; r < m; ++r)
      if (top_diff[std::int64_t(r) * outputs + o] != 0.f) {
        active.push_back(o);
        break;
      }
  const int count = static_cast<int>(active.size());
  // Each thread owns a contiguous range of columns and sweeps the needed rows in order, 8 at a time:
  // every element of the result sums over the rows in the same order, whatever the thread count.
#pragma omp parallel
  {
    const int threads = omp_get_num_threads(), t = omp_get_thread_num();
    const std::int64_t begin = std::int64_t(inputs) * t / threads,
                       end = std::int64_t(inputs) * (t + 1) / threads;
    for (int r = 0; r < m; ++r)
      std::fill(bottom_diff + r * std::int64_t(inputs) + begin, bottom_diff + r * std::int64_t(inputs) + end,
                0.f);
    float a[kStreamRows][kWeightRows];
    const float* w[kWeightRows];
    for (int first = 0; first < count; first += kWeightRows) {
      const int rows = std::min(kWeightRows, count - first);
      for (int i = 0; i < rows; ++i) w[i] = weights + std::int64_t(active[first + i]) * inputs;
      for (int r = 0; r < m; ++r)
        for (int i = 0; i < rows; ++i) a[r][i] = top_diff[std::int64_t(r) * outputs + active[first + i]];
      for (std::int64_t j = begin; j < end; j += kTile) {
        const std::int64_t width = std::min(kTile, end - j);
        for (int r = 0; r < m; ++r) {
          float* d = bottom_diff + std::int64_t(r) * inputs + j;
          if (rows == kWeightRows) {
            accumulate<kWeightRows>(a[r], w, j, d, width);
          } else {
            for (int i = 0; i < rows; ++i) accumulate<1>(a[r] + i, w + i, j, d, width);
          }
        }
      }
    }
  }
}

FASTSAL_VECTOR_CLONES
void inner_product_forward(int m, int inputs, int outputs, const float* bottom, const float* weights,
                           const float* bias, float* top) {
  if (m > kStreamRowsForward) {
    gemm(false, true, m, outputs, inputs, 1.f, bottom, weights, 0.f, top);
    if (bias)
      for (int r = 0; r < m; ++r)
        caffe::caffe_axpy<float>(outputs, 1.f, bias, top + std::int64_t(r) * outputs);
    return;
  }
  // Blocks of 8 W rows, walked a tile of columns at a time against every input row: W is read once.
  const int blocks = (outputs + kWeightRows - 1) / kWeightRows;
#pragma omp parallel for schedule(static)
  for (int b = 0; b < blocks; ++b) {
    const int o = b * kWeightRows, rows = std::min(kWeightRows, outputs - o);
    float sums[kStreamRowsForward][kWeightRows] = {};
    for (std::int64_t j = 0; j < inputs; j += kTile) {
      const std::int64_t width = std::min<std::int64_t>(kTile, inputs - j);
      for (int r = 0; r < m; ++r) {
        const float* x = bottom + std::int64_t(r) * inputs + j;
        for (int i = 0; i < rows; ++i) {
          const float* w = weights + std::int64_t(o + i) * inputs + j;
          float sum = 0.f;
#pragma omp simd reduction(+ : sum)
          for (std::int64_t k = 0; k < width; ++k) sum += x[k] * w[k];
          sums[r][i] += sum;
        }
      }
    }
    for (int r = 0; r < m; ++r)
      for (int i = 0; i < rows; ++i)
        top[std::int64_t(r) * outputs + o + i] = sums[r][i] + (bias ? bias[o + i] : 0.f);
  }
}

}  // namespace fastsal
