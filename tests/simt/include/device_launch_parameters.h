#pragma once
// SIMT emulation stand-in for <device_launch_parameters.h>; see tests/simt/README.md
#include "simt/simt.h"
