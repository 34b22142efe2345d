// The functions l2r_cuda._C offers l2r_cuda.jit (python_executor.cpp), for the module's method
// table (registration.cpp).
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace l2r {

// Null-terminated method table.
PyMethodDef* python_methods();

}  // namespace l2r
