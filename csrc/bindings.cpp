// The only torch-facing source: input checks, device and stream, dtype mapping, Python module.
// Compiled twice by the host compiler: into packed_kernels._C (CUDA tensors, the current CUDA
// stream, kernels built by nvcc) and with -DPK_SIMT=1 into packed_kernels._simt (CPU tensors,
// the same kernels on the SIMT emulator). Outputs are allocated by the caller (Python, through
// packed_kernels._alloc) and passed in.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#if !(defined(PK_SIMT) && PK_SIMT)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

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
}
