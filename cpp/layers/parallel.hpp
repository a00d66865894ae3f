// The OpenMP loops fastsal's element-wise layers share: over planes or elements, or over cache-sized
// chunks of several arrays at once.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastsal::layers {

// Caffe's per-element layers, term for term (the layers' files are built without FMA contraction, so
// every product and sum rounds where Caffe's does), spread over the cores: Caffe runs them on one.
template <typename F>
void parallel_for(std::int64_t count, F body) {
#pragma omp parallel for schedule(static) if (count >= (1 << 15))
  for (std::int64_t i = 0; i < count; ++i) body(i);
}

// An element-wise pass over several arrays, a cache-sized chunk at a time over the cores: each chunk
// stays in L1 from one array to the next instead of coming from memory once per array.
template <typename F>
void in_chunks(std::int64_t count, F body) {
  constexpr std::int64_t kChunk = 4096;
  const std::int64_t chunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (count >= (1 << 16))
  for (std::int64_t c = 0; c < chunks; ++c) body(c * kChunk, std::min(count, (c + 1) * kChunk));
}

}  // namespace fastsal::layers
