// The centroid pass's loop, compiled once per CPU capability (see per_capability.h).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "class_centroids.h"

#define IDD_KERNEL_FILE "class_centroids.inc"
#include "per_capability.h"
