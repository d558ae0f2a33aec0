"""Kernels and reference math: delta rule, attention, short convolution, and the backend choice."""
