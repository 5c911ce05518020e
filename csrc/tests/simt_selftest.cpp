// SPDX-License-Identifier: Apache-2.0
// The emulator's self-test: runs the kernels of selftest_kernels.cuh (and the real ensemble
// kernels) and prints key=value results for tests/test_simt_emulator.py to judge; usage: simt_selftest <case>.
// Built by the test with g++ -DPK_SIMT=1 -fsanitize=address,undefined (the CPU emulator), and on a
// GPU machine with nvcc -x cu (the same cases on the GPU, except those about emulator faults).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "ensemble.cuh"
#include "selftest_kernels.cuh"

namespace {

std::mt19937 rng(1234);

#ifdef PK_SIMT_ENABLED
constexpr bool kOnGpu = false;
void* allocate(std::size_t bytes) { return ::operator new(bytes, std::align_val_t(32)); }  // exact size for ASan
void release(void* p) { ::operator delete(p, std::align_val_t(32)); }
void finish() {}
#else
constexpr bool kOnGpu = true;
void check(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
    std::exit(3);
  }
}
void* allocate(std::size_t bytes) {
  void* p = nullptr;
  check(cudaMallocManaged(&p, bytes));
  return p;
}
void release(void* p) { check(cudaFree(p)); }
void finish() { check(cudaDeviceSynchronize()); }
#endif

// Memory both the host and the kernels can use (host memory in the emulator, managed on a GPU).
template <typename T>
struct Array {
  T* data;
  std::size_t size;
  explicit Array(std::size_t n, T fill = T()) : data(static_cast<T*>(allocate(n * sizeof(T)))), size(n) {
    for (std::size_t i = 0; i < n; ++i) data[i] = fill;
  }
  Array(const std::vector<T>& v) : Array(v.size()) {
    for (std::size_t i = 0; i < size; ++i) data[i] = v[i];
  }
  ~Array() { release(data); }
  Array(const Array&) = delete;
  Array& operator=(const Array&) = delete;
  T& operator[](std::size_t i) { return data[i]; }
};

std::vector<float> random_floats(std::size_t n, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

double block_sum_error(bool with_barrier, int launches, int* wrong_launches) {
  const int n = 1000, blocks = 3;
  double worst = 0.0;
  *wrong_launches = 0;
  for (int launch = 0; launch < launches; ++launch) {
    Array<float> x(random_floats(n));
    Array<float> sums(blocks, NAN);
    if (with_barrier)
      pk::launch(selftest::block_sum_kernel<true>, dim3(blocks), dim3(selftest::kSumThreads), 0, nullptr,
                 x.data, sums.data, n);
    else
      pk::launch(selftest::block_sum_kernel<false>, dim3(blocks), dim3(selftest::kSumThreads), 0, nullptr,
                 x.data, sums.data, n);
    finish();
    double launch_error = 0.0;
    for (int b = 0; b < blocks; ++b) {
      double ref = 0.0, scale = 0.0;
      for (int i = b * selftest::kSumThreads; i < n; i += selftest::kSumThreads * blocks)
        for (int t = 0; t < selftest::kSumThreads && i + t < n; ++t) {
          ref += x[i + t];
          scale += std::fabs(x[i + t]);
        }
      const double err = std::fabs(sums[b] - ref) / scale;
      launch_error = std::isnan(err) ? INFINITY : std::max(launch_error, err);
    }
    if (launch_error > 1e-5) ++*wrong_launches;
    worst = std::max(worst, launch_error);
  }
  return worst;
}

void case_block_sum() {
  int wrong = 0;
  const double err = block_sum_error(true, 6, &wrong);
  std::printf("max_rel_error=%.3e\nwrong_launches=%d\n", err, wrong);
}

void case_missing_barrier() {
  int wrong = 0;
  const double err = block_sum_error(false, 6, &wrong);
  std::printf("max_rel_error=%.3e\nwrong_launches=%d\n", err, wrong);
}

void case_warp_ops() {
  const int warps = 3, n = warps * 32;
  Array<float> x(random_floats(n, 2.0f));
  Array<float> down(n, NAN), bfly(n, NAN), lane5(n, NAN), below(n, NAN);
  Array<unsigned int> ballot(n, 0);
  Array<int> any_all(2 * n, -1);
  pk::launch(selftest::warp_ops_kernel, dim3(warps), dim3(32), 0, nullptr, x.data, down.data,
             bfly.data, lane5.data, below.data, ballot.data, any_all.data);
  finish();
  int mismatches = 0;
  double sum_error = 0.0;
  for (int w = 0; w < warps; ++w) {
    double sum = 0.0, scale = 0.0;
    float mx = -INFINITY;
    unsigned int bits = 0;
    bool any = false, all = true;
    for (int l = 0; l < 32; ++l) {
      const float v = x[w * 32 + l];
      sum += v;
      scale += std::fabs(v);
      mx = std::max(mx, v);
      bits |= (v > 0.0f ? 1u : 0u) << l;
      any = any || v > 2.0f;
      all = all && v > -3.0f;
    }
    sum_error = std::max(sum_error, std::fabs(down[w * 32] - sum) / scale);
    for (int l = 0; l < 32; ++l) {
      const int i = w * 32 + l;
      mismatches += bfly[i] != mx;
      mismatches += lane5[i] != x[w * 32 + 5];
      mismatches += below[i] != x[l == 0 ? i : i - 1];
      mismatches += ballot[i] != bits;
      mismatches += any_all[2 * i] != int(any);
      mismatches += any_all[2 * i + 1] != int(all);
    }
  }
  std::printf("shuffle_sum_rel_error=%.3e\nmismatches=%d\n", sum_error, mismatches);
}

int warp_exchange_mismatches(bool sync_warp) {
  const int blocks = 3, n = blocks * 32;
  Array<float> x(random_floats(n)), out(n, NAN);
  if (sync_warp)
    pk::launch(selftest::warp_exchange_kernel<true>, dim3(blocks), dim3(32), 0, nullptr, x.data, out.data);
  else
    pk::launch(selftest::warp_exchange_kernel<false>, dim3(blocks), dim3(32), 0, nullptr, x.data, out.data);
  finish();
  int mismatches = 0;
  for (int b = 0; b < blocks; ++b)
    for (int l = 0; l < 32; ++l) mismatches += out[b * 32 + l] != x[b * 32 + (l + 1) % 32];
  return mismatches;
}

void case_warp_exchange() { std::printf("mismatches=%d\n", warp_exchange_mismatches(true)); }

void case_missing_syncwarp() { std::printf("mismatches=%d\n", warp_exchange_mismatches(false)); }

void case_barrier_votes() {
  const int blocks = 3, threads = 80, n = blocks * threads;
  Array<float> x(random_floats(n));
  Array<int> out(3 * n, -1);
  pk::launch(selftest::barrier_votes_kernel, dim3(blocks), dim3(threads), 0, nullptr,
             static_cast<const float*>(x.data), out.data);
  finish();
  int mismatches = 0;
  for (int b = 0; b < blocks; ++b) {
    int count = 0;
    bool all = true, any = false;
    for (int t = 0; t < threads; ++t) {
      const float v = x[b * threads + t];
      count += v > 0.0f;
      all = all && v > -2.0f;
      any = any || v > 1.5f;
    }
    for (int t = 0; t < threads; ++t) {
      const int* mine = out.data + 3 * (b * threads + t);
      mismatches += (mine[0] != count) + (mine[1] != int(all)) + (mine[2] != int(any));
    }
  }
  std::printf("mismatches=%d\n", mismatches);
}

void case_block_allreduce() {
  const int blocks = 2, threads = 96, n = blocks * threads;
  Array<float> x(random_floats(n));
  Array<float> out(2 * n, NAN);
  pk::launch(selftest::block_allreduce_kernel, dim3(blocks), dim3(threads), 0, nullptr, x.data, out.data);
  finish();
  int mismatches = 0;
  double error = 0.0;
  for (int b = 0; b < blocks; ++b) {
    double sum = 0.0, scale = 0.0;
    float mx = -INFINITY;
    for (int t = 0; t < threads; ++t) {
      sum += x[b * threads + t];
      scale += std::fabs(x[b * threads + t]);
      mx = std::max(mx, x[b * threads + t]);
    }
    for (int t = 0; t < threads; ++t) {
      const int i = b * threads + t;
      mismatches += out[2 * i] != out[2 * b * threads];  // bit-identical on every thread
      mismatches += out[2 * i + 1] != mx;
      error = std::max(error, std::fabs(out[2 * i] - sum) / scale);
    }
  }
  std::printf("sum_rel_error=%.3e\nmismatches=%d\n", error, mismatches);
}

void case_histogram() {
  const int n = 5000, bins = 37;
  Array<int> values(n), hist(bins, 0);
  std::vector<int> ref(bins, 0);
  std::uniform_int_distribution<int> pick(0, bins - 1);
  for (int i = 0; i < n; ++i) {
    values[i] = pick(rng);
    ++ref[values[i]];
  }
  pk::launch(selftest::histogram_kernel, dim3(4), dim3(64), bins * sizeof(int), nullptr, values.data, n,
             bins, hist.data);
  finish();
  int mismatches = 0;
  for (int b = 0; b < bins; ++b) mismatches += hist[b] != ref[b];
  std::printf("mismatches=%d\n", mismatches);
}

// Worst |c - sum_k product(i, j, k)| / sum_k |product(i, j, k)| over the M x N row-major c
// (infinite where c is NaN): a tile's error against its exact product, relative to its terms.
template <typename Product>
double worst_product_error(const float* c, int M, int N, int K, Product product) {
  double worst = 0.0;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double ref = 0.0, scale = 0.0;
      for (int k = 0; k < K; ++k) {
        const double p = product(i, j, k);
        ref += p;
        scale += std::fabs(p);
      }
      const double err = std::fabs(c[i * N + j] - ref) / scale;
      worst = std::isnan(err) ? INFINITY : std::max(worst, err);
    }
  return worst;
}

template <typename T, typename LayoutB>
double tile_error() {
  const int M = 32, N = 48, K = 64;
  Array<T> a_array(M * K), b_array(K * N);
  Array<float> c_array(M * N, NAN);
  T* a = a_array.data;
  T* b = b_array.data;
  float* c = c_array.data;
  std::vector<double> a64(M * K), b64(K * N);  // the rounded inputs, row-major
  std::vector<float> av = random_floats(M * K), bv = random_floats(K * N);
  for (int i = 0; i < M * K; ++i) {
    a[i] = pk::from_float<T>(av[i]);
    a64[i] = pk::to_float(a[i]);
  }
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < N; ++j) {
      const T v = pk::from_float<T>(bv[k * N + j]);
      b[LayoutB::row_major ? k * N + j : j * K + k] = v;
      b64[k * N + j] = pk::to_float(v);
    }
  pk::launch(selftest::tile_matmul_kernel<T, LayoutB>, dim3(M / 16, N / 16), dim3(32), 0, nullptr,
             static_cast<const T*>(a), static_cast<const T*>(b), c, M, N, K, 0);
  finish();
  // the kernel halves its accumulator
  return worst_product_error(c, M, N, K,
                             [&](int i, int j, int k) { return 0.5 * a64[i * K + k] * b64[k * N + j]; });
}

void case_tile_mma() {
  using selftest::ColMajor;
  using selftest::RowMajor;
  std::printf("half_row_b=%.3e\n", tile_error<pk::half, RowMajor>());
  std::printf("half_col_b=%.3e\n", tile_error<pk::half, ColMajor>());
  std::printf("bfloat16_row_b=%.3e\n", tile_error<pk::bfloat16, RowMajor>());
  std::printf("bfloat16_col_b=%.3e\n", tile_error<pk::bfloat16, ColMajor>());
}

// TF32 operands as the hardware sees them: the upper 19 bits (truncated), or rounded to nearest
// with ties away from zero first (cvt.rna.tf32.f32, what to_tf32 does).
float tf32_truncated(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}
float tf32_rounded(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// Worst error of the TF32 tile against `operand`'s view of the inputs, relative to sum |a b|;
// kRound: the kernel rounds its operands.
template <bool kRound>
double tile_tf32_error(float (*operand)(float)) {
  const int M = 16, N = 8, K = 64;
  // random floats with all 23 mantissa bits set at random: truncating and rounding differ
  Array<float> a(random_floats(M * K)), b(random_floats(K * N)), c(M * N, NAN);
  pk::launch(selftest::tile_tf32_kernel<kRound>, dim3(1), dim3(32), 0, nullptr, static_cast<const float*>(a.data),
             static_cast<const float*>(b.data), c.data, K);
  finish();
  return worst_product_error(c.data, M, N, K, [&](int i, int j, int k) {
    return double(operand(a[i * K + k])) * double(operand(b[k * N + j]));
  });
}

void case_tile_tf32() {
  std::printf("truncated=%.3e\n", tile_tf32_error<false>(tf32_truncated));
  std::printf("rounded=%.3e\n", tile_tf32_error<true>(tf32_rounded));
  // the other rounding's reference must be off, or the check above could not tell them apart
  std::printf("truncated_as_rounded=%.3e\n", tile_tf32_error<false>(tf32_rounded));
  std::printf("rounded_as_truncated=%.3e\n", tile_tf32_error<true>(tf32_truncated));
}

void case_transpose() {
  const int rows = 37, cols = 21;  // partial tiles on both edges
  Array<float> in(random_floats(rows * cols)), out(rows * cols, NAN);
  pk::launch(selftest::transpose_kernel, dim3((cols + 15) / 16, (rows + 15) / 16), dim3(16, 16), 0, nullptr,
             static_cast<const float*>(in.data), out.data, rows, cols);
  finish();
  int mismatches = 0;
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) mismatches += out[c * rows + r] != in[r * cols + c];
  std::printf("mismatches=%d\n", mismatches);
}

void expect_fault(const std::function<void()>& run) {
  try {
    run();
    std::printf("fault=none\n");
  } catch (const std::exception& e) {
    std::printf("fault=%s\n", e.what());
  }
}

void case_tile_misaligned() {  // shared tiles shifted by one element: ldmatrix rows misaligned
  Array<pk::half> a(16 * 16, pk::from_float<pk::half>(1.0f)), b(16 * 16, pk::from_float<pk::half>(1.0f));
  Array<float> c(16 * 16);
  expect_fault([&] {
    pk::launch(selftest::tile_matmul_kernel<pk::half, selftest::RowMajor>, dim3(1), dim3(32), 0, nullptr,
               static_cast<const pk::half*>(a.data), static_cast<const pk::half*>(b.data), c.data, 16, 16, 16, 1);
  });
}

void case_oob_shared() {
  Array<float> out(64);
  pk::launch(selftest::oob_shared_write_kernel, dim3(1), dim3(64), 0, nullptr, out.data);
  std::printf("fault=none\n");
}

void case_oob_global() {
  const int n = 100;
  Array<float> out(n);
  pk::launch(selftest::oob_global_write_kernel, dim3(4), dim3(32), 0, nullptr, out.data, n);
  std::printf("fault=none\n");
}

// Mismatches of the two-stage cp.async pipeline kernel (zero-filled every third step).
int async_pipeline_mismatches(bool wait) {
  const int blocks = 3, steps = 7, n = blocks * steps * selftest::kCopyThreads * 4;
  Array<float> x(random_floats(n)), out(n, NAN);
  if (wait)
    pk::launch(selftest::async_pipeline_kernel<true>, dim3(blocks), dim3(selftest::kCopyThreads), 0, nullptr,
               static_cast<const float*>(x.data), out.data, steps);
  else
    pk::launch(selftest::async_pipeline_kernel<false>, dim3(blocks), dim3(selftest::kCopyThreads), 0, nullptr,
               static_cast<const float*>(x.data), out.data, steps);
  finish();
  int mismatches = 0;
  for (int b = 0; b < blocks; ++b)
    for (int s = 0; s < steps; ++s)
      for (int t = 0; t < selftest::kCopyThreads; ++t)
        for (int j = 0; j < 4; ++j) {
          const int source = ((b * steps + s) * selftest::kCopyThreads + (t + 1) % selftest::kCopyThreads) * 4 + j;
          const float expected = s % 3 == 2 ? 0.0f : x[source];
          mismatches += out[((b * steps + s) * selftest::kCopyThreads + t) * 4 + j] != expected;
        }
  return mismatches;
}

void case_async_pipeline() { std::printf("mismatches=%d\n", async_pipeline_mismatches(true)); }

void case_missing_async_wait() { std::printf("mismatches=%d\n", async_pipeline_mismatches(false)); }

void case_async_not_waited() {
  Array<float> x(4, 1.0f), out(32);
  expect_fault([&] {
    pk::launch(selftest::async_not_waited_kernel, dim3(1), dim3(32), 0, nullptr, static_cast<const float*>(x.data), out.data);
  });
}

void case_early_exit() {
  Array<float> out(64);
  expect_fault([&] { pk::launch(selftest::early_exit_kernel, dim3(1), dim3(64), 0, nullptr, out.data); });
}

void case_divergent_warp_op() {
  Array<float> out(32);
  expect_fault([&] { pk::launch(selftest::divergent_warp_op_kernel, dim3(1), dim3(32), 0, nullptr, out.data); });
}

// pk::Divmod against / and % : every dividend below 2^14 and random ones up to
// 2^31 - 1 (and 2^31 - 1 itself), for small and random divisors, on the host and in a kernel.
void case_divmod() {
  std::uniform_int_distribution<int> any(0, 0x7fffffff);
  std::vector<int> dividends, divisors;
  for (int d = 1; d <= 64; ++d) divisors.push_back(d);
  for (int i = 0; i < 64; ++i) divisors.push_back(any(rng) | 1);
  divisors.push_back(0x7fffffff);
  for (int n = 0; n < (1 << 14); ++n) dividends.push_back(n);
  for (int i = 0; i < 4096; ++i) dividends.push_back(any(rng));
  dividends.push_back(0x7fffffff);
  Array<int> n(dividends), q(dividends.size()), r(dividends.size());
  long mismatches = 0;
  for (int d : divisors) {
    const pk::Divmod by(d);
    pk::launch(selftest::divmod_kernel, dim3(1), dim3(256), 0, nullptr, static_cast<const int*>(n.data),
               static_cast<int>(n.size), by, q.data, r.data);
    finish();
    for (std::size_t i = 0; i < n.size; ++i) {
      int host_q, host_r;
      by.divmod(n[i], host_q, host_r);
      mismatches += q[i] != n[i] / d || r[i] != n[i] % d || host_q != n[i] / d || host_r != n[i] % d;
    }
  }
  std::printf("mismatches=%ld\n", mismatches);
}

void case_half_conversions() {
  int mismatches = 0;
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    pk::half h;
    std::memcpy(&h, &bits, 2);
    const float f = pk::to_float(h);
    const pk::half back = pk::from_float<pk::half>(f);
    std::uint16_t back_bits;
    std::memcpy(&back_bits, &back, 2);
    if (std::isnan(f) ? !std::isnan(pk::to_float(back)) : back_bits != bits) ++mismatches;
    pk::bfloat16 g;
    std::memcpy(&g, &bits, 2);
    const float fg = pk::to_float(g);
    const pk::bfloat16 gback = pk::from_float<pk::bfloat16>(fg);
    std::memcpy(&back_bits, &gback, 2);
    if (std::isnan(fg) ? !std::isnan(pk::to_float(gback)) : back_bits != bits) ++mismatches;
  }
  // Ties round to even; overflow and underflow.
  const std::pair<float, float> half_cases[] = {
      {1.0f + 0x1p-11f, 1.0f}, {1.0f + 3 * 0x1p-11f, 1.0f + 0x1p-9f}, {65520.0f, INFINITY},
      {65519.0f, 65504.0f}, {0x1p-25f, 0.0f}, {0x1.8p-25f, 0x1p-24f}, {-2.5f, -2.5f}};
  for (auto [in, want] : half_cases) mismatches += pk::to_float(pk::from_float<pk::half>(in)) != want;
  const std::pair<float, float> bf16_cases[] = {{1.0f + 0x1p-8f, 1.0f}, {1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-6f}};
  for (auto [in, want] : bf16_cases) mismatches += pk::to_float(pk::from_float<pk::bfloat16>(in)) != want;
  std::printf("mismatches=%d\n", mismatches);
}

// The real ensemble kernels on exact-size buffers (ASan watches their bounds); the numbers are
// judged by the Python tests, here only basic identities: probabilities sum to one, the mean
// backward's rows sum to zero, everything finite.
template <typename T>
void ensemble_checks(int M, int B, int C, int S, double* worst_sum, int* non_finite) {
  const std::size_t n = std::size_t(M) * B * C * S, rows = std::size_t(B) * C * S;
  Array<T> x_array(n), out_array(rows), grad_array(rows), gx_array(n);
  T* x = x_array.data;
  T* out = out_array.data;
  T* grad = grad_array.data;
  T* gx = gx_array.data;
  std::vector<float> xv = random_floats(n, 3.0f), gv = random_floats(rows);
  for (std::size_t i = 0; i < n; ++i) x[i] = pk::from_float<T>(xv[i]);
  for (std::size_t i = 0; i < rows; ++i) grad[i] = pk::from_float<T>(gv[i]);
  const pk::ScalarType dtype = std::is_same<T, float>::value ? pk::ScalarType::kFloat32
                               : std::is_same<T, pk::half>::value ? pk::ScalarType::kFloat16
                                                                   : pk::ScalarType::kBFloat16;
  const double tolerance = std::is_same<T, float>::value ? 1e-5 : 1e-2 * std::sqrt(double(C));
  pk::ensemble::mean_forward(dtype, x, out, M, B, C, S, nullptr);
  pk::ensemble::mean_backward(dtype, grad, x, gx, M, B, C, S, nullptr);
  finish();
  for (int b = 0; b < B; ++b)
    for (int s = 0; s < S; ++s) {
      double total = 0.0;
      for (int c = 0; c < C; ++c) total += pk::to_float(out[(std::size_t(b) * C + c) * S + s]);
      *worst_sum = std::max(*worst_sum, std::fabs(total - 1.0) / tolerance);
      for (int m = 0; m < M; ++m) {
        double g_total = 0.0;
        for (int c = 0; c < C; ++c) g_total += pk::to_float(gx[((std::size_t(m) * B + b) * C + c) * S + s]);
        *worst_sum = std::max(*worst_sum, std::fabs(g_total) / (10 * tolerance));
      }
    }
  for (std::size_t i = 0; i < n; ++i) *non_finite += !std::isfinite(pk::to_float(gx[i]));
  if (S == 1) {
    Array<T> scores_array(5 * B), g_scores_array(5 * B);
    T* scores = scores_array.data;
    T* g_scores = g_scores_array.data;
    for (int i = 0; i < 5 * B; ++i) g_scores[i] = pk::from_float<T>(gv[i % rows]);
    pk::ensemble::scores_forward(dtype, x, out, scores, scores + B, scores + 2 * B, scores + 3 * B,
                                 scores + 4 * B, M, B, C, nullptr);
    pk::ensemble::scores_backward(dtype, grad, g_scores, g_scores + B, g_scores + 2 * B, g_scores + 3 * B,
                                  x, gx, M, B, C, nullptr);
    finish();
    for (int i = 0; i < 5 * B; ++i) *non_finite += !std::isfinite(pk::to_float(scores[i]));
    for (std::size_t i = 0; i < n; ++i) *non_finite += !std::isfinite(pk::to_float(gx[i]));
  }
}

void case_ensemble() {
  double worst = 0.0;
  int non_finite = 0;
  // (M, B, C, S): vectorised rows (C a multiple of 8), odd C, trailing dims, many estimators.
  const int shapes[][4] = {{4, 2, 64, 1}, {3, 2, 37, 1}, {1, 1, 2, 1}, {2, 2, 5, 3}, {64, 1, 40, 1}, {5, 1, 1000, 1}};
  for (const auto& s : shapes) {
    ensemble_checks<float>(s[0], s[1], s[2], s[3], &worst, &non_finite);
    ensemble_checks<pk::half>(s[0], s[1], s[2], s[3], &worst, &non_finite);
    ensemble_checks<pk::bfloat16>(s[0], s[1], s[2], s[3], &worst, &non_finite);
  }
  std::printf("worst_sum_error_over_tolerance=%.3e\nnon_finite=%d\n", worst, non_finite);
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, void (*)()> cases = {
      {"block_sum", case_block_sum},
      {"missing_barrier", case_missing_barrier},
      {"warp_ops", case_warp_ops},
      {"warp_exchange", case_warp_exchange},
      {"missing_syncwarp", case_missing_syncwarp},
      {"block_allreduce", case_block_allreduce},
      {"barrier_votes", case_barrier_votes},
      {"histogram", case_histogram},
      {"tile_mma", case_tile_mma},
      {"tile_misaligned", case_tile_misaligned},
      {"tile_tf32", case_tile_tf32},
      {"transpose", case_transpose},
      {"oob_shared", case_oob_shared},
      {"oob_global", case_oob_global},
      {"early_exit", case_early_exit},
      {"async_pipeline", case_async_pipeline},
      {"missing_async_wait", case_missing_async_wait},
      {"async_not_waited", case_async_not_waited},
      {"divergent_warp_op", case_divergent_warp_op},
      {"divmod", case_divmod},
      {"half_conversions", case_half_conversions},
      {"ensemble", case_ensemble},
  };
  if (argc != 2 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: %s <case>; cases:", argv[0]);
    for (const auto& c : cases) std::fprintf(stderr, " %s", c.first.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  const std::string name = argv[1];
  const bool emulator_only = name == "missing_barrier" || name == "missing_syncwarp" || name == "tile_misaligned" || name == "oob_shared" ||
                             name == "oob_global" || name == "early_exit" || name == "divergent_warp_op" ||
                             name == "missing_async_wait" || name == "async_not_waited";
  if (kOnGpu && emulator_only) {
    std::printf("skipped=emulator only\n");
    return 0;
  }
  cases.at(name)();
  return 0;
}
