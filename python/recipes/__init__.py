"""Training and evaluation recipes built on packed_kernels (used by python/*.py)."""
