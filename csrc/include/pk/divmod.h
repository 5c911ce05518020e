// SPDX-License-Identifier: Apache-2.0
// Division by a divisor fixed for a whole launch, as a multiply-high and a shift (Granlund and
// Montgomery, "Division by invariant integers using multiplication", 1994): for 0 <= n < 2^31 and
// 1 <= d < 2^31, with l = ceil(log2 d) and m = ceil(2^(31 + l) / d) (< 2^32),
// n / d = (n * m) >> (31 + l), exactly. A hardware integer division is ~20 instructions; this is 2.
//
//   const pk::Divmod by_width(W);        // host or device, once
//   int q, r; by_width.divmod(n, q, r);  // q = n / W, r = n % W
#pragma once

#include <cstdint>

#include "pk/simt.h"

namespace pk {

struct Divmod {
  int divisor;
  unsigned multiplier;  // 0 for divisor 1
  int shift;

  Divmod() = default;
  PK_HOST_DEVICE explicit Divmod(int d) : divisor(d), multiplier(0), shift(0) {
    if (d <= 1) return;
    int log2_ceil = 0;
    while ((1LL << log2_ceil) < d) ++log2_ceil;
    multiplier = static_cast<unsigned>(((1ULL << (31 + log2_ceil)) + d - 1) / static_cast<unsigned long long>(d));
    shift = log2_ceil - 1;  // applied after taking the high 32 bits of the 64-bit product
  }
  PK_HOST_DEVICE int div(int n) const {
    if (multiplier == 0) return n;
    return static_cast<int>(mul_high(static_cast<unsigned>(n), multiplier) >> shift);
  }
  PK_HOST_DEVICE void divmod(int n, int& quotient, int& remainder) const {
    quotient = div(n);
    remainder = n - quotient * divisor;
  }

 private:
  PK_HOST_DEVICE static unsigned mul_high(unsigned a, unsigned b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
#endif
  }
};

}  // namespace pk
