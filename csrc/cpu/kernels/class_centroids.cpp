// The centroid pass's loops, compiled once per CPU capability (see per_capability.h).
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "class_centroids.h"

// The vector helpers of the baseline variant pass 32-byte vectors without AVX; they are
// inline in an anonymous namespace, so no call crosses an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#define IDD_KERNEL_FILE "class_centroids.inc"
#include "per_capability.h"
