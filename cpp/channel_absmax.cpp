#include "channel_absmax.hpp"

namespace fastsal {

void channel_absmax_cpu(const float* gradient, const ChannelAbsMaxLayout& layout, float* out) {
  // Serial: the engine's workers each reduce their own batch, and this is <1% of a backward pass.
  const std::ptrdiff_t size = layout.size();
  for (std::ptrdiff_t i = 0; i < size; ++i) out[layout.out_index(i)] = channel_absmax_at(gradient, layout, i);
}

}  // namespace fastsal
