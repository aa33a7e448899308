// The softmax-KL loops, compiled once per CPU capability (see per_capability.h).
#include <algorithm>
#include <limits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../../common/softmax_kl.h"
#include "softmax_kl.h"

#define IDD_KERNEL_FILE "softmax_kl.inc"
#include "per_capability.h"
