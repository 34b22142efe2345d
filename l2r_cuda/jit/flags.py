"""The device-compiler flags of every build of the CUDA kernels: setup.py (nvcc, the extension),
tests/test_cuda_compile.py (nvcc -cubin, the register report) and l2r_cuda.jit (NVRTC). No imports:
setup.py and the compile test read this file before torch or l2r_cuda can be imported."""

# The floating-point contract (csrc/common/hd.h): no a*b+c contracted into an FMA behind the math's
# back, so every backend rounds the same operations the same way.
FP_CONTRACT = ("--fmad=false",)

# The half/bfloat16 header switches torch.utils.cpp_extension adds to every nvcc compile of an
# extension (its COMMON_NVCC_FLAGS), so that NVRTC sees the cuda_fp16.h / cuda_bf16.h API the
# extension's kernels were written against.
TORCH_HALF_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")

# The C++ standard of the extension's device code (torch 2.14's extension builds use C++20).
CXX_STANDARD = "-std=c++20"

# nvcc only (NVRTC has no such option and needs none: it compiles device code alone).
NVCC_ONLY = ("--expt-relaxed-constexpr",)

# nvcc's front end (cicc) keeps shared-memory addresses in 32-bit registers by default; NVRTC keeps
# them in 64 bits and has no option to change that (neither -Xnvvm -nvptx-short-ptr nor an llc form
# of it has any effect in NVRTC 13.0). So the nvcc build is compiled the NVRTC way instead: the
# extension's kernels and l2r_cuda.jit's are then the same compiler's output from the same PTX, with
# the same registers (tests/test_jit.py checks every kernel). cicc's --sharedmem32=0 is not in
# nvcc's documentation: setup.py probes it and builds without it (a warning) where an nvcc rejects it,
# so an install never breaks on it; tests/test_cuda_compile.py passes it as is, so CI fails naming it.
NVCC_SHARED_POINTERS_AS_NVRTC = ("-Xcicc", "--sharedmem32=0")
