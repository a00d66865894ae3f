// What fastsal's oneDNN layers share: the CPU engine, one net's workspace of blocked copies and
// scratchpads, the layouts that reorder to and from Caffe's, and whether the CPU has AMX.
#pragma once

#ifdef FASTSAL_WITH_DNNL
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <oneapi/dnnl/dnnl.hpp>

namespace fastsal::layers {

dnnl::engine& cpu_engine();

// Buffers shared by every oneDNN layer of one net (they run one at a time): the blocked copies of the
// activations and diffs, and the scratchpads. Per layer they would double the net's activation memory.
class Workspace {
 public:
  enum Slot { kInput, kOutput, kScratchpad, kColumns, kStack, kSlots };  // kStack: LRP's stacked products
  void* get(Slot slot, std::size_t bytes);

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    std::size_t bytes = 0;
  };
  Buffer buffers_[kSlots];
};

// A tensor in the layout a oneDNN primitive chose, fed from or read back into Caffe's plain one: the
// reorders and a buffer exist only when the two layouts differ. The buffer is the workspace's slot,
// or with no workspace the layout's own, kept between calls (the weights, reordered once per forward).
class Layout {
 public:
  Layout() = default;
  Layout(const dnnl::memory::desc& plain, const dnnl::memory::desc& chosen, Workspace* workspace,
         Workspace::Slot slot);
  // The primitive's argument holding Caffe's values at `data`.
  dnnl::memory in(dnnl::stream& stream, const float* data) const;
  // The primitive's argument for an output that belongs at `data`; then `back` puts it there.
  dnnl::memory out(float* data) const;
  void back(dnnl::stream& stream, float* data) const;
  // The layout's own copy (null when the layouts agree or the workspace holds it), kept between calls.
  const dnnl::memory& kept() const { return own_; }
  // What it needs of the workspace's `slot`.
  std::size_t bytes_in(Workspace::Slot slot) const {
    return copies_ && workspace_ && slot_ == slot ? chosen_.get_size() : 0;
  }

 private:
  dnnl::memory buffer() const;
  dnnl::memory::desc plain_, chosen_;
  Workspace* workspace_ = nullptr;
  Workspace::Slot slot_ = Workspace::kInput;
  bool copies_ = false;
  dnnl::memory own_;
  dnnl::reorder to_chosen_, to_plain_;
};

bool cpu_has_amx();

// Where oneDNN's fp32 Winograd F(4x4, 3x3) beats its direct kernel (1.3-1.8x, measured: dnnl_conv_layer.hpp):
// 3x3, stride 1, no dilation, one group, from 28x28 output pixels up. By the shape alone, never the batch.
inline bool winograd_pays(const int* kernel, const int* stride, const int* dilation, int group,
                          std::int64_t output_pixels) {
  return kernel[0] == 3 && kernel[1] == 3 && stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 &&
         dilation[1] == 1 && group == 1 && output_pixels >= 28 * 28;
}

}  // namespace fastsal::layers
#endif  // FASTSAL_WITH_DNNL
