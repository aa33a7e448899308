#pragma once
// Graph capture status, for the emulator (tests/cuda_emu): it never captures.
namespace c10 {
namespace cuda {

enum class CaptureStatus : int { None = 0, Active = 1, Invalidated = 2 };

inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }

}  // namespace cuda
}  // namespace c10
