# SPDX-License-Identifier: Apache-2.0
"""Property-based differential tests: drawn shapes, dtypes (the convs), layouts (dense,
channels_last, strided views), empty batches, NaN/±inf at drawn positions and options, on each
backend runnable here, against torch's own functions. A result must have torch's NaN positions
and, elsewhere, its values. CI-sized and seeded (derandomize); HYPOTHESIS_PROFILE=slow draws more."""

import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

import packed_kernels as pk  # noqa: E402

from conftest import backend_device  # noqa: E402
from packed_kernels import _backend  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("slow", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _runnable(backend):
    device = backend_device(backend)
    if _backend.unavailable_reason(backend, device, torch.float32) is not None:
        return None
    return device


def _tensor(shape, layout, generator, special=None, special_at=0.0, dtype=torch.float32):
    """`dtype` values in `layout` ("nchw", "channels_last" or "strided": every other column of
    a wider tensor), with `special` (NaN, ±inf) written at a drawn position."""
    wide = list(shape)
    if layout == "strided":
        wide[-1] *= 2
    t = torch.randn(wide, generator=generator).to(dtype)
    if layout == "strided":
        t = t[..., ::2]
    elif layout == "channels_last" and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    if special is not None and t.numel():
        flat = int(special_at * t.numel()) % t.numel()
        t[tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))] = SPECIALS[special]
    return t


def _to(t, device):
    """To `device`, keeping a strided view strided (a plain copy would make it dense)."""
    if t is None or t.device == device:
        return t
    if not (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)):
        base = torch.empty(*t.shape[:-1], 2 * t.shape[-1], device=device, dtype=t.dtype)
        view = base[..., ::2]
        view.copy_(t)
        return view
    return t.to(device)


# Value tolerance by the result's dtype: a few roundings of the output and of the 16-bit
# intermediates (the prologue's x_hat is stored in the input dtype) over sums of <= 27 terms.
TOLERANCE = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _agree(ours, ref, what):
    tol = TOLERANCE[ours.dtype] if ours.dtype in TOLERANCE else 2e-4
    ours, ref = ours.detach().cpu().double(), ref.detach().double()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), f"{what}: NaN positions differ"
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol, equal_nan=True, msg=what)


special = st.sampled_from([None, "nan", "inf", "-inf"])
backends = st.sampled_from([b for b in ("torch", "triton", "simt", "cuda") if _runnable(b) is not None])


@given(backend=backends, n=st.integers(0, 2), groups=st.sampled_from([1, 2, 4]),
       cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), size=st.integers(3, 6),
       kernel=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]),
       layout=st.sampled_from(["nchw", "channels_last", "strided"]), value=special,
       at=st.floats(0, 1), prologue=st.booleans(), epilogue=st.booleans(), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(list(DTYPES)))
def test_fused_conv2d_agrees_with_torch(backend, n, groups, cin_g, cout_g, size, kernel, stride,
                                        padding, layout, value, at, prologue, epilogue, seed, dtype):
    device = _runnable(backend)
    g = torch.Generator().manual_seed(seed)
    c_in, c_out = groups * cin_g, groups * cout_g
    low = DTYPES[dtype]  # the inputs are in it; the reference computes on their values in fp32
    x = _tensor((n, c_in, size, size), layout, g, value, at, dtype=low)
    w = (torch.randn(c_out, cin_g, kernel, kernel, generator=g) / (cin_g * kernel)).to(low)
    b = torch.randn(c_out, generator=g).to(low)
    scale, shift = (torch.rand(c_in, generator=g) + 0.5).to(low), torch.randn(c_in, generator=g).to(low)
    args = dict(stride=stride, padding=padding, groups=groups)
    options = {}
    x_hat = x.float()
    if prologue:
        options.update(in_scale=_to(scale, device), in_shift=_to(shift, device), in_activation="relu")
        x_hat = torch.relu(x_hat * scale.float().view(1, -1, 1, 1) + shift.float().view(1, -1, 1, 1))
    ref = F.conv2d(x_hat, w.float(), b.float(), **args)
    if epilogue:
        options.update(activation="relu")
        ref = torch.relu(ref)
    ours = pk.fused_conv2d(_to(x, device), _to(w, device), _to(b, device), **args, **options,
                           backend=backend)
    _agree(ours, ref, f"fused_conv2d on {backend}")


@given(backend=backends, n=st.integers(0, 3), c=st.integers(1, 5),
       size=st.integers(1, 5), layout=st.sampled_from(["nchw", "channels_last", "strided"]),
       vectors=st.sampled_from(["dense", "strided", "expanded"]), value=special, at=st.floats(0, 1),
       training=st.booleans(), relu=st.booleans(), residual=st.booleans(), seed=st.integers(0, 2**16))
def test_batch_norm_agrees_with_torch(backend, n, c, size, layout, vectors, value, at, training,
                                      relu, residual, seed):
    device = _runnable(backend)
    if training and 0 < n * size * size <= 1:  # torch refuses one value per channel
        return
    g = torch.Generator().manual_seed(seed)
    x = _tensor((n, c, size, size), layout, g, value, at)
    res = torch.randn(x.shape, generator=g) if residual else None

    def vector(offset):
        if vectors == "expanded":
            return (torch.randn(1, generator=g) + offset).expand(c)
        v = torch.randn(2 * c if vectors == "strided" else c, generator=g).abs() + offset
        return v[::2] if vectors == "strided" else v
    weight, bias = vector(0.5), vector(0.0)
    running_mean, running_var = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
    ref_stats = running_mean.clone(), running_var.clone()
    ref = F.batch_norm(x, *ref_stats, weight, bias, training=training)
    ref = ref if res is None else ref + res
    ref = torch.relu(ref) if relu else ref
    ours_stats = _to(running_mean.clone(), device), _to(running_var.clone(), device)
    ours = pk.batch_norm(_to(x, device), *ours_stats, _to(weight, device), _to(bias, device),
                         training=training, residual=_to(res, device),
                         activation="relu" if relu else None, backend=backend)
    _agree(ours, ref, f"batch_norm on {backend}")
    for mine, theirs in zip(ours_stats, ref_stats):
        _agree(mine, theirs, f"batch_norm running statistics on {backend}")


@given(backend=backends, m=st.integers(1, 4), b=st.integers(1, 3),
       classes=st.integers(2, 7), value=special, at=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_ensemble_scores_agree_with_torch(backend, m, b, classes, value, at, seed):
    device = _runnable(backend)
    g = torch.Generator().manual_seed(seed)
    x = _tensor((m * b, classes), "nchw", g, value, at) * 3
    ours = pk.ensemble_scores(_to(x, device), m, backend=backend)
    ref = pk.ensemble_scores(x.double(), m, backend="torch")
    # votes follow each backend's argmax, which may break a tie with NaN differently from torch
    for name in ("probs", "msp", "max_logit", "entropy", "mutual_information"):
        _agree(getattr(ours, name), getattr(ref, name), f"ensemble_scores.{name} on {backend}")
    _agree(pk.ensemble_mean(_to(x, device), m, backend=backend), ref.probs, f"ensemble_mean on {backend}")
