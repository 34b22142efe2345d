#pragma once
// SIMT emulation stand-in for <math_constants.h>; see tests/simt/README.md
#include "simt/simt.h"
