#pragma once
// SIMT emulation stand-in for <cuda_runtime_api.h>; see tests/simt/README.md
#include "simt/simt.h"
