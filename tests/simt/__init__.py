"""SIMT CPU emulation harness for CUDA kernels (see README.md)."""
