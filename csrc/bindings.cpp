// SPDX-License-Identifier: Apache-2.0
// The only torch-facing source: input checks, device and stream, dtype mapping, Python module.
// Compiled twice by the host compiler: into packed_kernels._C (CUDA tensors, the current CUDA
// stream, kernels built by nvcc) and with -DPK_SIMT=1 into packed_kernels._simt (CPU tensors,
// the same kernels on the SIMT emulator). Outputs are allocated by the caller (Python, through
// packed_kernels._alloc) and passed in.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#if !(defined(PK_SIMT) && PK_SIMT)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "batch_norm.h"
#include "conv.h"
#include "ensemble.h"

namespace {

#if defined(PK_SIMT) && PK_SIMT
constexpr const char* kDeviceName = "CPU (the simt backend)";
bool on_backend_device(const at::Tensor& t) { return t.device().is_cpu(); }
#else
constexpr const char* kDeviceName = "CUDA";
bool on_backend_device(const at::Tensor& t) { return t.device().is_cuda(); }
#endif

pk::ScalarType scalar_type(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return pk::ScalarType::kFloat32;
    case at::kHalf: return pk::ScalarType::kFloat16;
    case at::kBFloat16: return pk::ScalarType::kBFloat16;
    default: TORCH_CHECK(false, op, ": the kernels support float32, float16 and bfloat16, got ", t.scalar_type());
  }
}

// `t` must be a contiguous tensor of `shape` on the same device and dtype as `like`.
void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                  at::IntArrayRef shape) {
  TORCH_CHECK(on_backend_device(t), op, ": ", name, " must be a ", kDeviceName, " tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", logits on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", logits ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

struct Layout {
  int64_t batch, classes, spatial;
};

Layout check_logits(const char* op, const at::Tensor& logits, int64_t num_estimators, bool flat) {
  TORCH_CHECK(on_backend_device(logits), op, ": logits must be a ", kDeviceName, " tensor, got ", logits.device());
  scalar_type(op, logits);
  TORCH_CHECK(logits.is_contiguous(), op, ": logits must be contiguous");
  TORCH_CHECK(flat ? logits.dim() == 2 : logits.dim() >= 2, op, ": logits must be (M*B, C",
              flat ? ")" : "[, *])", ", got ", logits.sizes());
  TORCH_CHECK(num_estimators >= 1 && num_estimators <= pk::ensemble::kMaxEstimators, op,
              ": num_estimators must be in [1, ", pk::ensemble::kMaxEstimators, "], got ", num_estimators);
  TORCH_CHECK(logits.numel() > 0 && logits.size(0) % num_estimators == 0, op, ": logits of shape ",
              logits.sizes(), " do not split into ", num_estimators, " estimators");
  return Layout{logits.size(0) / num_estimators, logits.size(1), logits.numel() / (logits.size(0) * logits.size(1))};
}

std::vector<int64_t> with_batch(const at::Tensor& logits, int64_t batch) {
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  shape[0] = batch;
  return shape;
}

// Sets the device for the call and yields the stream kernels go on.
struct DeviceScope {
#if defined(PK_SIMT) && PK_SIMT
  explicit DeviceScope(const at::Tensor&) {}
  pk::Stream stream() const { return nullptr; }
#else
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
  pk::Stream stream() const { return c10::cuda::getCurrentCUDAStream().stream(); }
  c10::cuda::CUDAGuard guard;
#endif
};

void ensemble_mean_forward(const at::Tensor& logits, int64_t num_estimators, at::Tensor& out) {
  const char* op = "ensemble_mean_forward";
  const Layout l = check_logits(op, logits, num_estimators, false);
  check_tensor(op, "out", out, logits, with_batch(logits, l.batch));
  DeviceScope scope(logits);
  pk::ensemble::mean_forward(scalar_type(op, logits), logits.const_data_ptr(), out.mutable_data_ptr(),
                             num_estimators, l.batch, l.classes, l.spatial, scope.stream());
}

void ensemble_mean_backward(const at::Tensor& grad, const at::Tensor& logits, int64_t num_estimators,
                            at::Tensor& grad_logits) {
  const char* op = "ensemble_mean_backward";
  const Layout l = check_logits(op, logits, num_estimators, false);
  check_tensor(op, "grad", grad, logits, with_batch(logits, l.batch));
  check_tensor(op, "grad_logits", grad_logits, logits, logits.sizes());
  DeviceScope scope(logits);
  pk::ensemble::mean_backward(scalar_type(op, logits), grad.const_data_ptr(), logits.const_data_ptr(),
                              grad_logits.mutable_data_ptr(), num_estimators, l.batch, l.classes,
                              l.spatial, scope.stream());
}

void ensemble_scores_forward(const at::Tensor& logits, int64_t num_estimators, std::vector<at::Tensor> outs) {
  const char* op = "ensemble_scores_forward";
  const Layout l = check_logits(op, logits, num_estimators, true);
  TORCH_CHECK(outs.size() == 6, op, ": expects 6 outputs (probs and 5 scores), got ", outs.size());
  check_tensor(op, "probs", outs[0], logits, {l.batch, l.classes});
  for (size_t i = 1; i < 6; ++i) check_tensor(op, "score", outs[i], logits, {l.batch});
  DeviceScope scope(logits);
  pk::ensemble::scores_forward(scalar_type(op, logits), logits.const_data_ptr(), outs[0].mutable_data_ptr(),
                               outs[1].mutable_data_ptr(), outs[2].mutable_data_ptr(),
                               outs[3].mutable_data_ptr(), outs[4].mutable_data_ptr(),
                               outs[5].mutable_data_ptr(), num_estimators, l.batch, l.classes,
                               scope.stream());
}

void ensemble_scores_backward(std::vector<at::Tensor> grads, const at::Tensor& logits,
                              int64_t num_estimators, at::Tensor& grad_logits) {
  const char* op = "ensemble_scores_backward";
  const Layout l = check_logits(op, logits, num_estimators, true);
  TORCH_CHECK(grads.size() == 5, op, ": expects the gradients of probs, msp, max_logit, entropy and "
              "mutual_information, got ", grads.size(), " tensors");
  check_tensor(op, "grad_probs", grads[0], logits, {l.batch, l.classes});
  for (size_t i = 1; i < 5; ++i) check_tensor(op, "grad of a score", grads[i], logits, {l.batch});
  check_tensor(op, "grad_logits", grad_logits, logits, logits.sizes());
  DeviceScope scope(logits);
  pk::ensemble::scores_backward(scalar_type(op, logits), grads[0].const_data_ptr(), grads[1].const_data_ptr(),
                                grads[2].const_data_ptr(), grads[3].const_data_ptr(),
                                grads[4].const_data_ptr(), logits.const_data_ptr(),
                                grad_logits.mutable_data_ptr(), num_estimators, l.batch, l.classes,
                                scope.stream());
}

// --- grouped convolution (csrc/kernels/conv.h): channels_last activations, OHWI weight -------

struct ConvArgs {
  std::vector<int64_t> stride, padding, dilation;  // padding: (top, left); bottom/right follow
  int64_t groups;                                   // from the output size
};

void check_conv_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                       at::IntArrayRef shape, bool channels_last) {
  TORCH_CHECK(on_backend_device(t), op, ": ", name, " must be a ", kDeviceName, " tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", input on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", input ", like.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(channels_last ? t.is_contiguous(at::MemoryFormat::ChannelsLast) : t.is_contiguous(), op, ": ",
              name, channels_last ? " must be channels_last contiguous (NHWC)" : " must be contiguous");
}

void check_fp32_buffer(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like,
                       at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), ", input on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape && t.is_contiguous(), op, ": ", name, " must be a contiguous ", shape,
              " tensor, got ", t.sizes());
}

// Per-channel vectors are float32 for every activation dtype (the Python side converts).
const float* optional_vector(const char* op, const char* name, const std::optional<at::Tensor>& t,
                             const at::Tensor& like, int64_t channels) {
  if (!t.has_value()) return nullptr;
  check_fp32_buffer(op, name, *t, like, {channels});
  return t->const_data_ptr<float>();
}

pk::conv::Activation conv_activation(const char* op, int64_t activation) {
  TORCH_CHECK(activation == 0 || activation == 1, op, ": activation code must be 0 (none) or 1 (relu), got ",
              activation);
  return static_cast<pk::conv::Activation>(activation);
}

// The shape from the input (N, C_in, H, W), the OHWI weight and the output's spatial size.
pk::conv::Shape conv_shape(const char* op, at::IntArrayRef input, at::IntArrayRef weight_ohwi,
                           int64_t out_h, int64_t out_w, const ConvArgs& a) {
  TORCH_CHECK(input.size() == 4 && weight_ohwi.size() == 4, op, ": input must be 4-D and the weight "
              "(C_out, KH, KW, C_in/groups)");
  TORCH_CHECK(a.stride.size() == 2 && a.padding.size() == 2 && a.dilation.size() == 2, op,
              ": stride, padding (top, left) and dilation are pairs");
  TORCH_CHECK(a.groups >= 1 && input[1] % a.groups == 0 && weight_ohwi[0] % a.groups == 0 &&
              weight_ohwi[3] * a.groups == input[1], op, ": channels do not split into ", a.groups,
              " groups (input ", input, ", weight OHWI ", weight_ohwi, ")");
  pk::conv::Shape s;
  s.batch = input[0];
  s.in_channels = input[1];
  s.height = input[2];
  s.width = input[3];
  s.out_channels = weight_ohwi[0];
  s.kernel_h = weight_ohwi[1];
  s.kernel_w = weight_ohwi[2];
  s.out_height = out_h;
  s.out_width = out_w;
  s.stride_h = static_cast<int>(a.stride[0]);
  s.stride_w = static_cast<int>(a.stride[1]);
  s.pad_top = static_cast<int>(a.padding[0]);
  s.pad_left = static_cast<int>(a.padding[1]);
  s.dilation_h = static_cast<int>(a.dilation[0]);
  s.dilation_w = static_cast<int>(a.dilation[1]);
  s.groups = static_cast<int>(a.groups);
  TORCH_CHECK(s.stride_h >= 1 && s.stride_w >= 1 && s.dilation_h >= 1 && s.dilation_w >= 1 &&
              s.pad_top >= 0 && s.pad_left >= 0 && out_h >= 1 && out_w >= 1, op,
              ": invalid stride/padding/dilation/output size");
  return s;
}

void conv_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& in_scale, const std::optional<at::Tensor>& in_shift,
                  int64_t in_activation, const std::optional<at::Tensor>& out_scale,
                  const std::optional<at::Tensor>& out_shift, const std::optional<at::Tensor>& residual,
                  int64_t activation, std::vector<int64_t> stride, std::vector<int64_t> padding,
                  std::vector<int64_t> dilation, int64_t groups, at::Tensor& y,
                  const std::optional<at::Tensor>& stats, bool tf32) {
  const char* op = "conv_forward";
  scalar_type(op, x);
  TORCH_CHECK(y.dim() == 4, op, ": y must be 4-D");
  const pk::conv::Shape s = conv_shape(op, x.sizes(), weight.sizes(), y.size(2), y.size(3),
                                       ConvArgs{stride, padding, dilation, groups});
  check_conv_tensor(op, "input", x, x, x.sizes(), true);
  check_conv_tensor(op, "weight", weight, x, weight.sizes(), false);
  check_conv_tensor(op, "y", y, x, {s.batch, s.out_channels, s.out_height, s.out_width}, true);
  pk::conv::Prologue pro{optional_vector(op, "in_scale", in_scale, x, s.in_channels),
                         optional_vector(op, "in_shift", in_shift, x, s.in_channels),
                         conv_activation(op, in_activation)};
  pk::conv::Epilogue epi{optional_vector(op, "bias", bias, x, s.out_channels),
                         optional_vector(op, "out_scale", out_scale, x, s.out_channels),
                         optional_vector(op, "out_shift", out_shift, x, s.out_channels), nullptr,
                         conv_activation(op, activation)};
  if (residual.has_value()) {
    check_conv_tensor(op, "residual", *residual, x, y.sizes(), true);
    epi.residual = residual->const_data_ptr();
  }
  float* stats_ptr = nullptr;
  if (stats.has_value()) {
    check_fp32_buffer(op, "stats", *stats, x, {pk::conv::forward_row_tiles(s), 2, s.out_channels});
    stats_ptr = stats->mutable_data_ptr<float>();
  }
  DeviceScope scope(x);
  pk::conv::forward(scalar_type(op, x), s, x.const_data_ptr(), weight.const_data_ptr(), pro, epi,
                    y.mutable_data_ptr(), stats_ptr, scope.stream(), tf32);
}

void conv_input_grad(const at::Tensor& grad, const at::Tensor& weight, std::vector<int64_t> stride,
                     std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
                     at::Tensor& grad_input, bool tf32) {
  const char* op = "conv_input_grad";
  scalar_type(op, grad);
  TORCH_CHECK(grad.dim() == 4, op, ": grad must be 4-D");
  const pk::conv::Shape s = conv_shape(op, grad_input.sizes(), weight.sizes(), grad.size(2), grad.size(3),
                                       ConvArgs{stride, padding, dilation, groups});
  check_conv_tensor(op, "grad", grad, grad, {s.batch, s.out_channels, s.out_height, s.out_width}, true);
  check_conv_tensor(op, "weight", weight, grad, weight.sizes(), false);
  check_conv_tensor(op, "grad_input", grad_input, grad, grad_input.sizes(), true);
  DeviceScope scope(grad);
  const pk::ScalarType dtype = scalar_type(op, grad);
  const std::int64_t workspace_bytes = pk::conv::input_grad_workspace_bytes(dtype, s);
  at::Tensor workspace;  // from torch's allocator: 16-byte aligned, freed after the stream's use
  if (workspace_bytes > 0) workspace = at::empty({workspace_bytes}, grad.options().dtype(at::kByte));
  pk::conv::input_grad(dtype, s, grad.const_data_ptr(), weight.const_data_ptr(), grad_input.mutable_data_ptr(),
                       scope.stream(), workspace_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, tf32);
}

// partials: (splits, C_out, KH, KW, C_in/groups) fp32, summed over splits by the caller.
void conv_weight_grad(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& in_scale,
                      const std::optional<at::Tensor>& in_shift, int64_t in_activation,
                      std::vector<int64_t> stride, std::vector<int64_t> padding,
                      std::vector<int64_t> dilation, int64_t groups, at::Tensor& partials, bool tf32) {
  const char* op = "conv_weight_grad";
  scalar_type(op, x);
  TORCH_CHECK(grad.dim() == 4 && partials.dim() == 5, op, ": grad must be 4-D and partials 5-D");
  const pk::conv::Shape s = conv_shape(op, x.sizes(), partials.sizes().slice(1), grad.size(2), grad.size(3),
                                       ConvArgs{stride, padding, dilation, groups});
  check_conv_tensor(op, "input", x, x, x.sizes(), true);
  check_conv_tensor(op, "grad", grad, x, {s.batch, s.out_channels, s.out_height, s.out_width}, true);
  check_fp32_buffer(op, "partials", partials, x, partials.sizes());
  TORCH_CHECK(partials.size(0) >= 1 && partials.size(0) <= 65535, op, ": bad number of splits");
  pk::conv::Prologue pro{optional_vector(op, "in_scale", in_scale, x, s.in_channels),
                         optional_vector(op, "in_shift", in_shift, x, s.in_channels),
                         conv_activation(op, in_activation)};
  DeviceScope scope(x);
  pk::conv::weight_grad(scalar_type(op, x), s, grad.const_data_ptr(), x.const_data_ptr(), pro,
                        partials.mutable_data_ptr<float>(), static_cast<int>(partials.size(0)), scope.stream(),
                        tf32);
}

int64_t conv_forward_row_tiles(int64_t batch, int64_t out_h, int64_t out_w) {
  pk::conv::Shape s{};
  s.batch = batch;
  s.out_height = out_h;
  s.out_width = out_w;
  return pk::conv::forward_row_tiles(s);
}

int64_t conv_weight_grad_splits(int64_t batch, int64_t in_channels, int64_t out_channels, int64_t kernel_h,
                                int64_t kernel_w, int64_t out_h, int64_t out_w, int64_t groups) {
  TORCH_CHECK(groups >= 1, "conv_weight_grad_splits: groups must be >= 1");
  pk::conv::Shape s{};
  s.batch = batch;
  s.in_channels = in_channels;
  s.out_channels = out_channels;
  s.kernel_h = kernel_h;
  s.kernel_w = kernel_w;
  s.out_height = out_h;
  s.out_width = out_w;
  s.groups = static_cast<int>(groups);
  return pk::conv::weight_grad_splits(s);
}

// --- batch norm (csrc/kernels/batch_norm.h): contiguous (NCHW) or channels_last activations ----

// The (rows, C, S) view of x; `channels_last` says which of the two layouts x is in.
pk::batch_norm::Layout bn_layout(const char* op, const at::Tensor& x, bool& channels_last) {
  TORCH_CHECK(on_backend_device(x), op, ": input must be a ", kDeviceName, " tensor, got ", x.device());
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, op, ": input must be a non-empty tensor of >= 2 dimensions");
  const int64_t n = x.size(0), c = x.size(1), s = x.numel() / (n * c);
  if (x.is_contiguous()) {
    channels_last = false;
    return {n, c, s, c * s, s};
  }
  channels_last = (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  TORCH_CHECK(channels_last, op, ": input must be contiguous or channels_last contiguous");
  return {n * s, c, 1, c, 1};
}

// `t` (optional) has x's shape, dtype, device and layout; returns its data or null.
const void* bn_like(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x,
                    bool channels_last) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), ", input on ", x.device());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(), ", input ",
              x.scalar_type());
  TORCH_CHECK(t->sizes() == x.sizes(), op, ": ", name, " must have shape ", x.sizes(), ", got ", t->sizes());
  const auto format = !channels_last ? at::MemoryFormat::Contiguous
                      : x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  TORCH_CHECK(t->is_contiguous(format), op, ": ", name, " must be in the input's memory format");
  return t->const_data_ptr();
}

float* bn_vector_out(const char* op, const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x,
                     int64_t channels) {
  if (!t.has_value()) return nullptr;
  check_fp32_buffer(op, name, *t, x, {channels});
  return t->mutable_data_ptr<float>();
}

// The fp32 scratch the kernels need for x (call it with x's device current: DeviceScope).
int64_t bn_workspace_floats(const char* op, const at::Tensor& x, const pk::batch_norm::Layout& l) {
  return pk::batch_norm::workspace_floats(scalar_type(op, x), l);
}

float* bn_workspace(const char* op, const std::optional<at::Tensor>& t, const at::Tensor& x,
                    const pk::batch_norm::Layout& l) {
  TORCH_CHECK(t.has_value(), op, ": training needs the workspace (batch_norm_workspace_floats)");
  check_fp32_buffer(op, "workspace", *t, x, {bn_workspace_floats(op, x, l)});
  return t->mutable_data_ptr<float>();
}

// fp32 elements of the workspace that batch_norm_forward (training) and _backward take for x.
int64_t batch_norm_workspace_floats(const at::Tensor& x) {
  const char* op = "batch_norm_workspace_floats";
  bool channels_last = false;
  const pk::batch_norm::Layout l = bn_layout(op, x, channels_last);
  DeviceScope scope(x);
  return bn_workspace_floats(op, x, l);
}

void batch_norm_forward(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                        const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        bool training, double eps, bool relu, at::Tensor& out,
                        const std::optional<at::Tensor>& batch_mean, const std::optional<at::Tensor>& batch_var,
                        const std::optional<at::Tensor>& batch_invstd, const std::optional<at::Tensor>& workspace) {
  const char* op = "batch_norm_forward";
  scalar_type(op, x);
  bool channels_last = false;
  const pk::batch_norm::Layout l = bn_layout(op, x, channels_last);
  const void* res = bn_like(op, "residual", residual, x, channels_last);
  bn_like(op, "out", out, x, channels_last);
  const float* rm = optional_vector(op, "running_mean", running_mean, x, l.channels);
  const float* rv = optional_vector(op, "running_var", running_var, x, l.channels);
  TORCH_CHECK(training || (rm && rv), op, ": eval mode needs running_mean and running_var");
  float* bm = bn_vector_out(op, "batch_mean", batch_mean, x, l.channels);
  float* bv = bn_vector_out(op, "batch_var", batch_var, x, l.channels);
  float* bi = bn_vector_out(op, "batch_invstd", batch_invstd, x, l.channels);
  TORCH_CHECK(!training || (bm && bv && bi), op, ": training needs the batch statistics buffers");
  TORCH_CHECK(!training || l.rows * l.spatial > 1, op, ": expected more than 1 value per channel when training");
  DeviceScope scope(x);
  float* ws = training ? bn_workspace(op, workspace, x, l) : nullptr;
  pk::batch_norm::forward(scalar_type(op, x), l, x.const_data_ptr(), res, rm, rv,
                          optional_vector(op, "weight", weight, x, l.channels),
                          optional_vector(op, "bias", bias, x, l.channels), training, static_cast<float>(eps),
                          relu, out.mutable_data_ptr(), bm, bv, bi, ws, scope.stream());
}

void batch_norm_backward(const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& output,
                         const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                         bool training, bool relu, at::Tensor& grad_input, at::Tensor& grad_weight,
                         at::Tensor& grad_bias, const std::optional<at::Tensor>& grad_residual,
                         const std::optional<at::Tensor>& workspace) {
  const char* op = "batch_norm_backward";
  scalar_type(op, x);
  bool channels_last = false;
  const pk::batch_norm::Layout l = bn_layout(op, x, channels_last);
  const void* g = bn_like(op, "grad", grad, x, channels_last);
  const void* y = bn_like(op, "output", output, x, channels_last);
  TORCH_CHECK(!relu || y, op, ": relu needs the forward output");
  bn_like(op, "grad_input", grad_input, x, channels_last);
  bn_like(op, "grad_residual", grad_residual, x, channels_last);
  check_fp32_buffer(op, "mean", mean, x, {l.channels});
  check_fp32_buffer(op, "invstd", invstd, x, {l.channels});
  DeviceScope scope(x);
  float* ws = bn_workspace(op, workspace, x, l);
  pk::batch_norm::backward(scalar_type(op, x), l, g, x.const_data_ptr(), y, mean.const_data_ptr<float>(),
                           invstd.const_data_ptr<float>(), optional_vector(op, "weight", weight, x, l.channels),
                           training, relu, grad_input.mutable_data_ptr(),
                           bn_vector_out(op, "grad_weight", grad_weight, x, l.channels),
                           bn_vector_out(op, "grad_bias", grad_bias, x, l.channels),
                           grad_residual.has_value() ? grad_residual->mutable_data_ptr() : nullptr, ws,
                           scope.stream());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "packed_kernels CUDA C++ kernels (outputs are passed in, preallocated)";
  m.def("ensemble_mean_forward", &ensemble_mean_forward, "out = mean_m softmax(logits_m)",
        py::arg("logits"), py::arg("num_estimators"), py::arg("out"));
  m.def("ensemble_mean_backward", &ensemble_mean_backward, py::arg("grad"), py::arg("logits"),
        py::arg("num_estimators"), py::arg("grad_logits"));
  m.def("ensemble_scores_forward", &ensemble_scores_forward,
        "outs = (probs, msp, max_logit, entropy, mutual_information, variation_ratio)",
        py::arg("logits"), py::arg("num_estimators"), py::arg("outs"));
  m.def("ensemble_scores_backward", &ensemble_scores_backward, py::arg("grads"), py::arg("logits"),
        py::arg("num_estimators"), py::arg("grad_logits"));
  m.def("conv_forward", &conv_forward,
        "y = epilogue(conv(prologue(x), w)); channels_last x/y/residual, OHWI weight",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("in_scale"), py::arg("in_shift"),
        py::arg("in_activation"), py::arg("out_scale"), py::arg("out_shift"), py::arg("residual"),
        py::arg("activation"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("y"), py::arg("stats"), py::arg("tf32") = false);
  m.def("conv_input_grad", &conv_input_grad, py::arg("grad"), py::arg("weight"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("grad_input"),
        py::arg("tf32") = false);
  m.def("conv_weight_grad", &conv_weight_grad, py::arg("grad"), py::arg("x"), py::arg("in_scale"),
        py::arg("in_shift"), py::arg("in_activation"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("groups"), py::arg("partials"), py::arg("tf32") = false);
  m.def("conv_forward_row_tiles", &conv_forward_row_tiles, py::arg("batch"), py::arg("out_h"),
        py::arg("out_w"));
  m.def("conv_forward_rows_per_tile", &pk::conv::forward_rows_per_tile);
  m.def("conv_weight_grad_splits", &conv_weight_grad_splits, py::arg("batch"), py::arg("in_channels"),
        py::arg("out_channels"), py::arg("kernel_h"), py::arg("kernel_w"), py::arg("out_h"),
        py::arg("out_w"), py::arg("groups"));
  m.def("batch_norm_forward", &batch_norm_forward,
        "out = relu?(batch_norm(x) + residual); batch statistics written in training",
        py::arg("x"), py::arg("residual"), py::arg("running_mean"), py::arg("running_var"), py::arg("weight"),
        py::arg("bias"), py::arg("training"), py::arg("eps"), py::arg("relu"), py::arg("out"),
        py::arg("batch_mean"), py::arg("batch_var"), py::arg("batch_invstd"), py::arg("workspace"));
  m.def("batch_norm_workspace_floats", &batch_norm_workspace_floats,
        "fp32 elements of the scratch batch_norm_forward (training) and batch_norm_backward take for x",
        py::arg("x"));
  m.def("batch_norm_backward", &batch_norm_backward, py::arg("grad"), py::arg("x"), py::arg("output"),
        py::arg("mean"), py::arg("invstd"), py::arg("weight"), py::arg("training"), py::arg("relu"),
        py::arg("grad_input"), py::arg("grad_weight"), py::arg("grad_bias"), py::arg("grad_residual"),
        py::arg("workspace"));
}
