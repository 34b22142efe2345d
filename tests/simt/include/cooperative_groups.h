#pragma once
#error "cooperative_groups is not supported by the SIMT CPU emulator (tests/simt)"
