#pragma once
// SIMT emulation stand-in for <vector_types.h>; see tests/simt/README.md
#include "simt/simt.h"
