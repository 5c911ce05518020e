# SPDX-License-Identifier: Apache-2.0
"""Test harness: picks the backends this machine can run.

Without a GPU, Triton kernels run under Triton's interpreter (TRITON_INTERPRET must be set
before triton is imported, hence here). PACKED_KERNELS_REQUIRE="simt,cuda" turns a missing
backend from a skip into a failure (CI uses it so a broken build cannot hide as skips)."""

import json
import os

import filelock  # torch's own dependency
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker takes its share of the cores (two workers on two cores would
# otherwise run four torch threads that slow each other down).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, torch.get_num_threads() // XDIST_WORKERS))

import pytest  # noqa: E402

from packed_kernels import _alloc, _backend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
KERNEL_BACKENDS = ("triton", "cuda", "simt")
REQUIRED = {b.strip() for b in os.environ.get("PACKED_KERNELS_REQUIRE", "").split(",") if b.strip()}


def backend_device(backend: str) -> torch.device:
    """The device a backend's kernels run on here: simt always runs on the CPU."""
    return torch.device("cpu") if backend == "simt" else DEVICE


def require_backend(backend: str, dtype: torch.dtype = torch.float32) -> torch.device:
    device = backend_device(backend)
    reason = _backend.unavailable_reason(backend, device, dtype)
    if reason is not None:
        if backend in REQUIRED:
            pytest.fail(f"backend {backend!r} is required here but unavailable: {reason}")
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    return device


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def require_compiled_call_signature() -> None:
    from packed_kernels import _checks
    if _checks.compiled_call_signature is None:
        if REQUIRED & {"simt", "cuda"}:  # the build that compiles those compiles _host too
            pytest.fail("packed_kernels._host is required here but not built")
        pytest.skip("packed_kernels._host is not built")


@pytest.fixture(params=["compiled", "python"])
def call_keys(request, monkeypatch):
    """The conv ops remembering valid calls under the compiled signature's keys, then under
    the Python signature's alone (as without packed_kernels._host, or under a tracer)."""
    from packed_kernels.ops import conv_checks
    if request.param == "compiled":
        require_compiled_call_signature()
    else:
        monkeypatch.setattr(conv_checks, "compiled_call_signature", None)
    for calls in (conv_checks._grouped_calls, conv_checks._fused_calls):
        monkeypatch.setattr(calls, "entries", {})
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """Each kernel backend, with the device its tensors must live on."""
    return request.param, require_backend(request.param)


@pytest.fixture(autouse=True)
def _poison_outputs():
    with _alloc.poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 results are judged against torch's own float32 error, so TF32 is off (torch's
    cuDNN convs may use it by default, and the Triton conv follows torch's switch); tests of
    the TF32 path turn it on themselves."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def once_per_run(tmp_path_factory, name: str, produce):
    """`produce(folder)` run once per test run, by whichever pytest-xdist worker asks first; the
    others wait for it and get the same result (produce's JSON-able return value). A module-scoped
    fixture runs in every worker that runs one of the module's tests, and for the compile fixtures
    that doubled minutes of CPU-bound work on CI's two cores. A produce() that raises (a failed
    assert, a skip) stores nothing: the next worker to ask runs it again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder: it holds every worker's base temp
    shared = root / "once"
    shared.mkdir(exist_ok=True)
    result = shared / f"{name}.json"
    with filelock.FileLock(str(shared / f"{name}.lock")):
        if result.exists():
            return json.loads(result.read_text())
        folder = shared / name
        folder.mkdir(exist_ok=True)
        value = produce(folder)
        result.write_text(json.dumps(value))
        return value
