// The namespace every route math header opens: l2r::route::math, inside this translation unit's
// instruction-set namespace (common/hd.h), with the lane functions in scope.
#pragma once

#include "../../common/fastmath.h"

#define L2R_ROUTE_MATH_BEGIN \
  namespace l2r {            \
  namespace route {          \
  namespace math {           \
  L2R_ISA_BEGIN              \
  using namespace ::l2r::lanes;

#define L2R_ROUTE_MATH_END \
  L2R_ISA_END              \
  }                        \
  }                        \
  }
