// The CPU allocator while the emulator is loaded: torch's own, with a redzone on either side of
// every allocation that the memory model watches (memory_model.h: guard), so an emulated kernel
// that reads or writes past a tensor's storage raises where a GPU would fault or silently use
// another allocation's bytes. Fresh storage comes filled with 0xFF bytes (NaN in every float
// dtype, -1 in every integer one), so an output element no kernel writes shows in every test,
// as the deterministic mode's fill shows it in the tests that turn that on. Installed by
// _emu_register (build.py); tensors allocated before keep torch's allocator and no redzones.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <memory_model.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

namespace emu {
namespace {

// Bytes on each side: past a few 16-byte vectors, and a multiple of torch's 64-byte alignment,
// so the data keeps it.
constexpr size_t kRedzone = 256;

// The block behind each data pointer: a DataPtr's context is its data pointer (torch's raw
// allocations require that), so the blocks are looked up by it.
struct Block {
  c10::DataPtr inner;  // the whole block, from torch's allocator
  size_t bytes;
};
std::mutex& blocks_mutex = *new std::mutex;  // never destroyed: tensors are freed at exit too
std::unordered_map<void*, Block>& blocks = *new std::unordered_map<void*, Block>;

void release(void* data) {
  Block block;
  {
    const std::lock_guard<std::mutex> lock(blocks_mutex);
    auto it = blocks.find(data);
    block = std::move(it->second);
    blocks.erase(it);
  }
  memory::unguard(data, block.bytes, kRedzone);
}  // block.inner frees the block through torch's deleter

class RedzoneAllocator final : public c10::Allocator {
 public:
  explicit RedzoneAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    c10::DataPtr inner = base_->allocate(bytes + 2 * kRedzone);
    void* data = static_cast<char*>(inner.get()) + kRedzone;
    const c10::Device device = inner.device();
    std::memset(data, 0xFF, bytes);  // NaN in every float dtype, -1 in every integer one
    memory::guard(data, bytes, kRedzone);
    {
      const std::lock_guard<std::mutex> lock(blocks_mutex);
      blocks.emplace(data, Block{std::move(inner), bytes});
    }
    return {data, data, &release, device};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  c10::Allocator* base_;
};

}  // namespace

void install_redzone_allocator() {
  static RedzoneAllocator* allocator = nullptr;
  if (allocator != nullptr) return;
  allocator = new RedzoneAllocator(c10::GetCPUAllocator());  // never destroyed, like torch's
  c10::SetCPUAllocator(allocator, /*priority=*/200);
}

}  // namespace emu
