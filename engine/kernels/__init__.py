"""Triton kernels, each beside a pure-PyTorch reference."""
