#pragma once
// Where the emulated CUDA sources register their kernels (tests/cuda_emu/build.py rewrites each
// `TORCH_LIBRARY_IMPL(idd_ops, CUDA, m)` to EMU_CUDA_IMPL(m)): the blocks are collected at load
// time and run later, into a library the tests choose. torch.ops.idd_ops_emu._emu_register()
// puts them under idd_ops_emu for CPU tensors; _emu_override(True) also over the CPU kernels of
// idd_ops itself (the dispatcher stacks them: _emu_override(False) removes them again and the
// CPU kernels return), so the whole Python API runs the CUDA kernels on CPU tensors.
#include <torch/library.h>

#include <vector>

namespace emu {

using ImplFn = void (*)(torch::Library&);

inline std::vector<ImplFn>& impl_blocks() {
  static std::vector<ImplFn> blocks;
  return blocks;
}

struct ImplRegistrar {
  explicit ImplRegistrar(ImplFn fn) { impl_blocks().push_back(fn); }
};

}  // namespace emu

#define EMU_CONCAT_(a, b) a##b
#define EMU_CONCAT(a, b) EMU_CONCAT_(a, b)
#define EMU_CUDA_IMPL_(m, id)                                                                   \
  static void EMU_CONCAT(emu_impl_, id)(torch::Library&);                                      \
  static const ::emu::ImplRegistrar EMU_CONCAT(emu_registrar_, id)(&EMU_CONCAT(emu_impl_, id)); \
  static void EMU_CONCAT(emu_impl_, id)(torch::Library & m)
#define EMU_CUDA_IMPL(m) EMU_CUDA_IMPL_(m, __COUNTER__)
