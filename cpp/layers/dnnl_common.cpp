#include "layers/dnnl_common.hpp"

#ifdef FASTSAL_WITH_DNNL
#include <cstdlib>
#include <memory>
#include <new>

namespace fastsal::layers {

dnnl::engine& cpu_engine() {
  static dnnl::engine cpu(dnnl::engine::kind::cpu, 0);
  return cpu;
}

void* Workspace::get(Slot slot, std::size_t bytes) {
  Buffer& buffer = buffers_[slot];
  if (buffer.bytes < bytes) {
    buffer.data.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
    if (!buffer.data) throw std::bad_alloc();
    buffer.bytes = bytes;
  }
  return buffer.data.get();
}

Layout::Layout(const dnnl::memory::desc& plain, const dnnl::memory::desc& chosen, Workspace* workspace,
               Workspace::Slot slot)
    : plain_(plain), chosen_(chosen), workspace_(workspace), slot_(slot), copies_(chosen != plain) {
  if (!copies_) return;
  if (!workspace_) own_ = dnnl::memory(chosen, cpu_engine());
  to_chosen_ = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), plain, cpu_engine(), chosen));
  to_plain_ = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), chosen, cpu_engine(), plain));
}

dnnl::memory Layout::in(dnnl::stream& stream, const float* data) const {
  dnnl::memory plain(plain_, cpu_engine(), const_cast<float*>(data));
  if (!copies_) return plain;
  dnnl::memory copy = buffer();
  to_chosen_.execute(stream, plain, copy);
  return copy;
}

dnnl::memory Layout::out(float* data) const {
  return copies_ ? buffer() : dnnl::memory(plain_, cpu_engine(), data);
}

void Layout::back(dnnl::stream& stream, float* data) const {
  if (!copies_) return;
  dnnl::memory copy = buffer(), plain(plain_, cpu_engine(), data);
  to_plain_.execute(stream, copy, plain);
}

dnnl::memory Layout::buffer() const {
  return own_ ? own_ : dnnl::memory(chosen_, cpu_engine(), workspace_->get(slot_, chosen_.get_size()));
}

bool cpu_has_amx() {
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  const auto amx = static_cast<unsigned>(dnnl::cpu_isa::avx512_core_amx);
  return (isa & amx) == amx;
}

}  // namespace fastsal::layers
#endif  // FASTSAL_WITH_DNNL
