// The cosine pass's loops, compiled once per CPU capability (see per_capability.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "pixel_centroid_cosine.h"

#define IDD_KERNEL_FILE "pixel_centroid_cosine.inc"
#include "per_capability.h"
