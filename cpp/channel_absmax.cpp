#include "channel_absmax.hpp"

namespace fastsal {

void channel_absmax_cpu(const float* gradient, const ChannelAbsMaxLayout& layout, float* out) {
  const std::ptrdiff_t size = layout.size();
  // Threaded like the engine's other CPU loops; one image's map is not worth waking the team for.
#pragma omp parallel for schedule(static) if (size >= (1 << 17))
  for (std::ptrdiff_t i = 0; i < size; ++i) out[layout.out_index(i)] = channel_absmax_at(gradient, layout, i);
}

}  // namespace fastsal
