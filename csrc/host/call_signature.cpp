// SPDX-License-Identifier: Apache-2.0
// packed_kernels._host: call_signature(*args), the key under which the ops remember a call that
// passed their argument checks (packed_kernels/_checks.py). It distinguishes exactly what the
// Python signature_of does -- a tensor's type, shape, dtype and device; an int's, bool's or
// str's type and value; a tuple's or list's type and items -- in one C call instead of ~30
// interpreted attribute reads, allocations and hashes (about 2 us per call on a small host CPU).
// Anything else (a float, a tensor subclass, symbolic sizes, an int beyond 64 bits) answers
// None, and the caller keys the call with signature_of instead.

#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

namespace {

template <typename T>
void append_bytes(std::string& key, const T& value) {
  key.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Appends `value`'s encoding (a tag, then fixed-size or length-prefixed fields, so distinct
// signatures never share a byte string); false where only signature_of can key it.
bool append_signature(std::string& key, PyObject* value, bool in_sequence) {
  if (value == Py_None) {
    key.push_back('N');
    return true;
  }
  PyTypeObject* type = Py_TYPE(value);
  if (type == &PyBool_Type) {
    key.push_back(value == Py_True ? 'T' : 'F');
    return true;
  }
  if (type == &PyLong_Type) {
    int overflow = 0;
    const long long number = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow != 0) return false;
    key.push_back('i');
    append_bytes(key, number);
    return true;
  }
  if (type == &PyUnicode_Type) {
    Py_ssize_t length = 0;
    const char* text = PyUnicode_AsUTF8AndSize(value, &length);
    if (text == nullptr) {  // a lone surrogate has no UTF-8
      PyErr_Clear();
      return false;
    }
    key.push_back('s');
    append_bytes(key, length);
    key.append(text, static_cast<size_t>(length));
    return true;
  }
  if ((type == &PyTuple_Type || type == &PyList_Type) && !in_sequence) {
    const Py_ssize_t length = PySequence_Fast_GET_SIZE(value);
    key.push_back(type == &PyTuple_Type ? '(' : '[');
    append_bytes(key, length);
    PyObject** items = PySequence_Fast_ITEMS(value);
    for (Py_ssize_t i = 0; i < length; ++i) {
      if (!append_signature(key, items[i], true)) return false;
    }
    return true;
  }
  // torch.Tensor and nn.Parameter exactly: a subclass may report another shape than its
  // TensorImpl's (fake, functional and wrapper tensors), so signature_of reads those.
  if (THPVariable_CheckExact(value)) {
    const at::Tensor& tensor = THPVariable_Unpack(value);
    const c10::TensorImpl* impl = tensor.unsafeGetTensorImpl();
    if (impl->is_nested() || impl->has_symbolic_sizes_strides()) return false;
    const c10::IntArrayRef sizes = impl->sizes();
    const auto dim = static_cast<int64_t>(sizes.size());
    key.push_back('t');
    append_bytes(key, type);
    append_bytes(key, dim);
    key.append(reinterpret_cast<const char*>(sizes.data()), sizes.size() * sizeof(int64_t));
    append_bytes(key, static_cast<int8_t>(tensor.scalar_type()));
    const c10::Device device = tensor.device();
    append_bytes(key, static_cast<int8_t>(device.type()));
    append_bytes(key, static_cast<int8_t>(device.index()));
    return true;
  }
  return false;
}

PyObject* call_signature(PyObject* /*module*/, PyObject* const* args, Py_ssize_t count) {
  std::string key;
  key.reserve(192);
  for (Py_ssize_t i = 0; i < count; ++i) {
    if (!append_signature(key, args[i], false)) Py_RETURN_NONE;
  }
  return PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
}

PyMethodDef methods[] = {
    {"call_signature", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_signature)),
     METH_FASTCALL,
     "call_signature(*args) -> bytes or None: the key of a call that signature_of's of its "
     "arguments would distinguish alike; None where signature_of must key it."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_host",
                          "packed_kernels' host-side helpers, compiled.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__host() { return PyModule_Create(&module_def); }
