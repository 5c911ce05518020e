# SPDX-License-Identifier: Apache-2.0
"""packed_kernels' benchmark suite: `python -m bench {table,conv,ensemble,bn,report}`.

Every measurement names the device it ran on; records go to bench/results/ as JSON with the
GPU, driver, library versions and commit. Speed claims come from these runs on a GPU only."""
