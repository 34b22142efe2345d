#pragma once
// SIMT emulation stand-in for <cuda_fp16.h>; see tests/simt/README.md
#include "simt/simt.h"
