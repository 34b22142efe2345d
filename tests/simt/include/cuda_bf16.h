#pragma once
// SIMT emulation stand-in for <cuda_bf16.h>; see tests/simt/README.md
#include "simt/simt.h"
