// The cosine map's float32 loops, compiled once per CPU capability (see per_capability.h).
#include <cstring>

#include "pixel_centroid_cosine.h"

// The vector helpers of the baseline variant pass 32-byte vectors without AVX; they are
// inline in an anonymous namespace, so no call crosses an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#define IDD_KERNEL_FILE "pixel_centroid_cosine.inc"
#include "per_capability.h"
