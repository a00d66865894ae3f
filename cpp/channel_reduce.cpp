#include "channel_reduce.hpp"

namespace fastsal {

void channel_reduce_cpu(const float* gradient, const ChannelLayout& layout, ChannelReduction op, float* out) {
  const std::ptrdiff_t size = layout.size();
  // Threaded like the engine's other CPU loops; one image's map is not worth waking the team for.
#pragma omp parallel for schedule(static) if (size >= (1 << 17))
  for (std::ptrdiff_t i = 0; i < size; ++i)
    out[layout.out_index(i)] = channel_reduce_at(gradient, layout, op, i);
}

}  // namespace fastsal
