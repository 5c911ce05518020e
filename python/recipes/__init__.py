# SPDX-License-Identifier: Apache-2.0
"""Training and evaluation recipes built on packed_kernels (used by python/*.py)."""
