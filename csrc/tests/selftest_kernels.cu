// SPDX-License-Identifier: Apache-2.0
// Instantiates every self-test kernel for nvcc, so tests/test_csrc_compile.py can check that the
// portability layer (shuffles, votes, atomics, shared memory, tensor-core tiles) compiles for the
// real targets. Not part of the extension.
#include "selftest_kernels.cuh"

extern void* const selftest_kernels[];
void* const selftest_kernels[] = {
    reinterpret_cast<void*>(selftest::block_sum_kernel<true>),
    reinterpret_cast<void*>(selftest::block_sum_kernel<false>),
    reinterpret_cast<void*>(selftest::warp_ops_kernel),
    reinterpret_cast<void*>(selftest::warp_exchange_kernel<true>),
    reinterpret_cast<void*>(selftest::warp_exchange_kernel<false>),
    reinterpret_cast<void*>(selftest::block_allreduce_kernel),
    reinterpret_cast<void*>(selftest::barrier_votes_kernel),
    reinterpret_cast<void*>(selftest::histogram_kernel),
    reinterpret_cast<void*>(selftest::tile_matmul_kernel<pk::half, selftest::RowMajor>),
    reinterpret_cast<void*>(selftest::tile_matmul_kernel<pk::half, selftest::ColMajor>),
    reinterpret_cast<void*>(selftest::tile_matmul_kernel<pk::bfloat16, selftest::RowMajor>),
    reinterpret_cast<void*>(selftest::tile_matmul_kernel<pk::bfloat16, selftest::ColMajor>),
    reinterpret_cast<void*>(selftest::transpose_kernel),
    reinterpret_cast<void*>(selftest::oob_shared_write_kernel),
    reinterpret_cast<void*>(selftest::oob_global_write_kernel),
    reinterpret_cast<void*>(selftest::early_exit_kernel),
    reinterpret_cast<void*>(selftest::divergent_warp_op_kernel),
    reinterpret_cast<void*>(selftest::async_pipeline_kernel<true>),
    reinterpret_cast<void*>(selftest::async_pipeline_kernel<false>),
    reinterpret_cast<void*>(selftest::async_not_waited_kernel),
};
