// The whole per-token route math (one header per concept, see README "Architecture").
#pragma once

#include "anchor_lse.h"
#include "gradients.h"
#include "probs.h"
#include "rmsnorm.h"
#include "selection.h"
#include "sips.h"
