"""Triton kernels, installed as `emu2_engine.kernels` (one kernel per file, each with the
PyTorch reference that defines it). Importing this package does not import triton; each
kernel module does, when it is first used."""
