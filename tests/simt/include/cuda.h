#pragma once
// SIMT emulation stand-in for <cuda.h>; see tests/simt/README.md
#include "simt/simt.h"
