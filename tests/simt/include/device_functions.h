#pragma once
// SIMT emulation stand-in for <device_functions.h>; see tests/simt/README.md
#include "simt/simt.h"
