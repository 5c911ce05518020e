// SPDX-License-Identifier: Apache-2.0
// The grouped convolution kernels (csrc/kernels/conv.cuh) on the SIMT emulator, outside Python,
// so tests/test_conv_cuda.py can build them with -fsanitize=address,undefined: every launcher
// runs once per dtype on a small odd shape (partial row and column tiles, padding, stride,
// dilation, every fusion option, split weight-grad with an empty slab) and is compared with a
// direct float64 loop over the same (rounded) inputs.
//
// Usage: conv_selftest <float32|float16|bfloat16> <odd|aligned>; prints key=value lines:
//   vectorized = whether the launchers took the 16-byte path ("aligned": channels per group a
//   multiple of 8, "odd": 3 per group, the scalar path);
//   forward, mean, var, input_grad, weight_grad = relative L2 error vs the reference (mean and
//   var: the channel statistics, the kernel's per-tile (sum, M2) merged with Chan's formula);
//   forward_plain, weight_grad_plain: the same without prologue and epilogue (with 16-bit types
//   and the 16-byte path: the cp.async pipeline, as input_grad always is).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "conv.cuh"

namespace {

using pk::conv::Shape;

struct Random {
  std::uint64_t state = 0x9e3779b97f4a7c15ULL;
  double next() {  // uniform in [-1, 1)
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return double(state >> 11) / double(1ULL << 52) - 1.0;
  }
};

template <typename T>
std::vector<T> random_values(std::size_t n, Random& rng, double scale, double offset) {
  std::vector<T> v(n);
  for (auto& e : v) e = pk::from_float<T>(float(rng.next() * scale + offset));
  return v;
}

template <typename T>
double value(const T& v) {
  return pk::to_float(v);
}

double relative_error(const std::vector<double>& ours, const std::vector<double>& ref) {
  double diff = 0, norm = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    diff += (ours[i] - ref[i]) * (ours[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff / norm);
}

template <typename T>
std::vector<double> as_double(const std::vector<T>& v) {
  std::vector<double> d(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) d[i] = value(v[i]);
  return d;
}

template <typename T>
int run(bool aligned) {
  Shape s{};
  if (aligned) {
    s.batch = 2, s.in_channels = 16, s.height = 5, s.width = 6;
    s.out_channels = 144, s.kernel_h = 3, s.kernel_w = 3, s.groups = 2;
    s.stride_h = 1, s.stride_w = 2, s.pad_top = 1, s.pad_left = 1, s.dilation_h = 1, s.dilation_w = 1;
  } else {
    s.batch = 2, s.in_channels = 6, s.height = 7, s.width = 6;
    s.out_channels = 132, s.kernel_h = 3, s.kernel_w = 2, s.groups = 2;
    s.stride_h = 2, s.stride_w = 1, s.pad_top = 1, s.pad_left = 1, s.dilation_h = 1, s.dilation_w = 2;
  }
  s.out_height = (s.height + 2 * s.pad_top - s.dilation_h * (s.kernel_h - 1) - 1) / s.stride_h + 1;
  s.out_width = (s.width + 2 * s.pad_left - s.dilation_w * (s.kernel_w - 1) - 1) / s.stride_w + 1;
  const long cin_g = s.in_channels / s.groups, cout_g = s.out_channels / s.groups;
  const long taps = s.kernel_h * s.kernel_w;
  const long x_size = s.batch * s.height * s.width * s.in_channels;
  const long y_size = s.batch * s.out_height * s.out_width * s.out_channels;
  const long w_size = s.out_channels * taps * cin_g;

  Random rng;
  auto x = random_values<T>(x_size, rng, 1.0, 0.0);
  auto w = random_values<T>(w_size, rng, 0.5, 0.0);
  auto bias = random_values<float>(s.out_channels, rng, 1.0, 0.0);  // per-channel vectors: fp32
  auto in_scale = random_values<float>(s.in_channels, rng, 0.5, 1.0);
  auto in_shift = random_values<float>(s.in_channels, rng, 0.5, 0.2);
  auto out_scale = random_values<float>(s.out_channels, rng, 0.5, 1.0);
  auto out_shift = random_values<float>(s.out_channels, rng, 0.5, 0.0);
  auto residual = random_values<T>(y_size, rng, 1.0, 0.0);
  auto grad = random_values<T>(y_size, rng, 1.0, 0.0);

  // x_hat = relu(x * in_scale + in_shift), rounded to T as the kernels stage it.
  std::vector<double> x_hat(x_size);
  for (long i = 0; i < x_size; ++i) {
    const long c = i % s.in_channels;
    const float u = std::fmax(float(value(x[i]) * value(in_scale[c]) + value(in_shift[c])), 0.0f);
    x_hat[i] = value(pk::from_float<T>(u));
  }
  std::vector<double> ref_y(y_size, 0.0), ref_out(y_size), ref_stats(2 * s.out_channels, 0.0);
  std::vector<double> ref_gx(x_size, 0.0), ref_gw(w_size, 0.0);
  // Without prologue and epilogue (the 16-bit, 16-byte path then runs the cp.async pipeline).
  std::vector<double> ref_plain_y(y_size, 0.0), ref_plain_gw(w_size, 0.0);
  for (long n = 0; n < s.batch; ++n)
    for (long oh = 0; oh < s.out_height; ++oh)
      for (long ow = 0; ow < s.out_width; ++ow)
        for (long co = 0; co < s.out_channels; ++co) {
          const long g = co / cout_g, yi = ((n * s.out_height + oh) * s.out_width + ow) * s.out_channels + co;
          for (long kh = 0; kh < s.kernel_h; ++kh)
            for (long kw = 0; kw < s.kernel_w; ++kw) {
              const long ih = oh * s.stride_h - s.pad_top + kh * s.dilation_h;
              const long iw = ow * s.stride_w - s.pad_left + kw * s.dilation_w;
              if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) continue;
              for (long ci = 0; ci < cin_g; ++ci) {
                const long xi = ((n * s.height + ih) * s.width + iw) * s.in_channels + g * cin_g + ci;
                const long wi = (co * taps + kh * s.kernel_w + kw) * cin_g + ci;
                ref_y[yi] += x_hat[xi] * value(w[wi]);
                ref_gx[xi] += value(grad[yi]) * value(w[wi]);
                ref_gw[wi] += value(grad[yi]) * x_hat[xi];
                ref_plain_y[yi] += value(x[xi]) * value(w[wi]);
                ref_plain_gw[wi] += value(grad[yi]) * value(x[xi]);
              }
            }
          const double y = ref_y[yi] + value(bias[co]);
          ref_stats[co] += y;
          ref_stats[s.out_channels + co] += y * y;
          ref_out[yi] = std::fmax(y * value(out_scale[co]) + value(out_shift[co]) + value(residual[yi]), 0.0);
        }

  const auto dtype = std::is_same<T, float>::value ? pk::ScalarType::kFloat32
                     : std::is_same<T, pk::half>::value ? pk::ScalarType::kFloat16
                                                        : pk::ScalarType::kBFloat16;
  const long row_tiles = pk::conv::forward_row_tiles(s);
  const long rows = s.batch * s.out_height * s.out_width, tile_rows = pk::conv::forward_rows_per_tile();
  std::vector<double> ref_mean(s.out_channels), ref_var(s.out_channels);
  for (long co = 0; co < s.out_channels; ++co) {
    ref_mean[co] = ref_stats[co] / rows;
    ref_var[co] = ref_stats[s.out_channels + co] / rows - ref_mean[co] * ref_mean[co];
  }
  std::vector<T> y(y_size, pk::from_float<T>(NAN));
  std::vector<float> stats(row_tiles * 2 * s.out_channels, NAN);
  const pk::conv::Prologue pro{in_scale.data(), in_shift.data(), pk::conv::Activation::kRelu};
  const pk::conv::Epilogue epi{bias.data(), out_scale.data(), out_shift.data(), residual.data(),
                               pk::conv::Activation::kRelu};
  pk::conv::forward(dtype, s, x.data(), w.data(), pro, epi, y.data(), stats.data(), nullptr);
  std::vector<double> our_mean(s.out_channels, 0.0), our_var(s.out_channels, 0.0);
  for (long co = 0; co < s.out_channels; ++co) {
    for (long t = 0; t < row_tiles; ++t) our_mean[co] += stats[t * 2 * s.out_channels + co];
    our_mean[co] /= rows;
    for (long t = 0; t < row_tiles; ++t) {
      const long count = rows - t * tile_rows < tile_rows ? rows - t * tile_rows : tile_rows;
      const double deviation = stats[t * 2 * s.out_channels + co] / count - our_mean[co];
      our_var[co] += stats[(t * 2 + 1) * s.out_channels + co] + count * deviation * deviation;
    }
    our_var[co] /= rows;
  }

  std::vector<T> gx(x_size, pk::from_float<T>(NAN));
  pk::conv::input_grad(dtype, s, grad.data(), w.data(), gx.data(), nullptr);
  // More slabs than the pixel range fills (48 or 30 pixels): the last one is empty and must
  // still be written.
  const int splits = 3;
  std::vector<float> partials(splits * w_size, NAN);
  pk::conv::weight_grad(dtype, s, grad.data(), x.data(), pro, partials.data(), splits, nullptr);
  std::vector<double> our_gw(w_size, 0.0);
  for (int k = 0; k < splits; ++k)
    for (long i = 0; i < w_size; ++i) our_gw[i] += partials[k * w_size + i];

  const pk::conv::Prologue no_pro{nullptr, nullptr, pk::conv::Activation::kNone};
  const pk::conv::Epilogue no_epi{nullptr, nullptr, nullptr, nullptr, pk::conv::Activation::kNone};
  std::vector<T> plain_y(y_size, pk::from_float<T>(NAN));
  pk::conv::forward(dtype, s, x.data(), w.data(), no_pro, no_epi, plain_y.data(), nullptr, nullptr);
  std::vector<float> plain_partials(splits * w_size, NAN);
  pk::conv::weight_grad(dtype, s, grad.data(), x.data(), no_pro, plain_partials.data(), splits, nullptr);
  std::vector<double> our_plain_gw(w_size, 0.0);
  for (int k = 0; k < splits; ++k)
    for (long i = 0; i < w_size; ++i) our_plain_gw[i] += plain_partials[k * w_size + i];

  std::printf("vectorized=%d\n", int(pk::conv::detail::vectorizable<T>(pk::conv::detail::geometry(s),
                                                                      {x.data(), w.data(), y.data()}).operands));
  std::printf("forward=%.3e\n", relative_error(as_double(y), ref_out));
  std::printf("mean=%.3e\n", relative_error(our_mean, ref_mean));
  std::printf("var=%.3e\n", relative_error(our_var, ref_var));
  std::printf("input_grad=%.3e\n", relative_error(as_double(gx), ref_gx));
  std::printf("weight_grad=%.3e\n", relative_error(our_gw, ref_gw));
  std::printf("forward_plain=%.3e\n", relative_error(as_double(plain_y), ref_plain_y));
  std::printf("weight_grad_plain=%.3e\n", relative_error(our_plain_gw, ref_plain_gw));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dtype = argc > 1 ? argv[1] : "", shape = argc > 2 ? argv[2] : "";
  if (shape == "odd" || shape == "aligned") {
    if (dtype == "float32") return run<float>(shape == "aligned");
    if (dtype == "float16") return run<pk::half>(shape == "aligned");
    if (dtype == "bfloat16") return run<pk::bfloat16>(shape == "aligned");
  }
  std::fprintf(stderr, "usage: conv_selftest float32|float16|bfloat16 odd|aligned\n");
  return 2;
}
