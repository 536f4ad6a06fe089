"""Triton kernels for the fast CUDA path; importing this package needs Triton."""
