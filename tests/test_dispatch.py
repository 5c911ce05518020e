# SPDX-License-Identifier: Apache-2.0
"""The measured engine choice (packed_kernels.dispatch) with fake engines: the choice, engines
that disagree or fail, the disk cache, CUDA-graph capture, the policies, and the conv ops'
backend "auto" deciding when they run (under torch.compile too)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from packed_kernels import dispatch
from packed_kernels.ops import conv as conv_ops
from packed_kernels.ops import conv_engines

from conftest import require_backend


class FakeEngines:
    """Engines whose results and times are given; records which ran."""

    def __init__(self, results, times_us):
        self.results, self.times_us, self.ran = results, times_us, []

    def trial(self, engine):
        self.ran.append(engine)
        result = self.results[engine]
        if isinstance(result, Exception):
            raise result
        return result

    def timer(self, run):
        run()
        return self.times_us[self.ran[-1]]


def _dispatcher(tmp_path, monkeypatch, engines, capturing=False):
    monkeypatch.setenv("PACKED_KERNELS_CACHE_DIR", str(tmp_path))
    return dispatch.Dispatcher(dispatch.JsonCache("dispatch"), timer=engines.timer,
                               capturing=lambda: capturing)


REFERENCE = torch.tensor([1.0, -2.0, 3.0])
KEY = ("forward", "Fake GPU", "float16", 64)


def test_the_fastest_engine_that_agrees_is_chosen_and_reported(tmp_path, monkeypatch):
    engines = FakeEngines({"torch": REFERENCE, "triton": REFERENCE + 1e-4, "cuda": REFERENCE},
                          {"torch": 30.0, "triton": 10.0, "cuda": 20.0})
    chooser = _dispatcher(tmp_path, monkeypatch, engines)
    assert chooser.choose(KEY, ("torch", "triton", "cuda"), engines.trial, dispatch.agree) == "triton"
    ran = len(engines.ran)
    assert chooser.choose(KEY, ("torch", "triton", "cuda"), engines.trial, dispatch.agree) == "triton"
    assert len(engines.ran) == ran  # decided once
    [row] = chooser.report()
    assert row["engine"] == "triton" and row["source"] == "measured"
    assert row["timings_us"] == {"torch": 30.0, "triton": 10.0, "cuda": 20.0}


def test_an_engine_that_disagrees_or_fails_is_never_chosen_and_named_once(tmp_path, monkeypatch):
    wrong = REFERENCE.clone()
    wrong[1] = 5.0
    engines = FakeEngines({"torch": REFERENCE, "triton": wrong, "cuda": RuntimeError("no kernel")},
                          {"torch": 30.0, "triton": 1.0, "cuda": 1.0})
    chooser = _dispatcher(tmp_path, monkeypatch, engines)
    with pytest.warns(RuntimeWarning, match="'triton' engine fails or disagrees with cuDNN"):
        assert chooser.choose(KEY, ("torch", "triton", "cuda"), engines.trial, dispatch.agree) == "torch"
    [row] = chooser.report()
    assert set(row["rejected"]) == {"triton", "cuda"} and "no kernel" in row["rejected"]["cuda"]
    assert set(row["timings_us"]) == {"torch"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same engine is not named twice
        chooser.choose(KEY[:-1] + (128,), ("torch", "triton"), engines.trial, dispatch.agree)


def test_decisions_persist_on_disk_for_the_next_process(tmp_path, monkeypatch):
    engines = FakeEngines({"torch": REFERENCE, "cuda": REFERENCE}, {"torch": 5.0, "cuda": 2.0})
    _dispatcher(tmp_path, monkeypatch, engines).choose(KEY, ("torch", "cuda"), engines.trial,
                                                       dispatch.agree)
    assert (tmp_path / "dispatch.json").exists()
    fresh = _dispatcher(tmp_path, monkeypatch, FakeEngines({}, {}))  # would fail if it ran anything
    assert fresh.choose(KEY, ("torch", "cuda"), lambda e: 1 / 0, dispatch.agree) == "cuda"
    assert fresh.report()[0]["source"] == "cache"
    # a cached engine not usable here (another build) is not taken: measured again
    again = FakeEngines({"torch": REFERENCE, "triton": REFERENCE}, {"torch": 1.0, "triton": 2.0})
    assert _dispatcher(tmp_path, monkeypatch, again).choose(
        KEY, ("torch", "triton"), again.trial, dispatch.agree) == "torch"
    assert again.ran


def test_nothing_is_measured_inside_a_cuda_graph_capture(tmp_path, monkeypatch):
    engines = FakeEngines({"torch": REFERENCE, "cuda": REFERENCE}, {"torch": 5.0, "cuda": 2.0})
    capturing = _dispatcher(tmp_path, monkeypatch, engines, capturing=True)
    assert capturing.choose(KEY, ("torch", "cuda"), engines.trial, dispatch.agree) == "torch"
    assert engines.ran == [] and capturing.report() == []  # not remembered: measured later
    capturing.capturing = lambda: False
    assert capturing.choose(KEY, ("torch", "cuda"), engines.trial, dispatch.agree) == "cuda"
    capturing.capturing = lambda: True
    assert capturing.choose(KEY, ("torch", "cuda"), lambda e: 1 / 0, dispatch.agree) == "cuda"


def test_policies(tmp_path, monkeypatch):
    engines = FakeEngines({"torch": REFERENCE, "cuda": REFERENCE}, {"torch": 5.0, "cuda": 2.0})
    chooser = _dispatcher(tmp_path, monkeypatch, engines)
    monkeypatch.setenv("PACKED_KERNELS_DISPATCH", "torch")
    assert chooser.choose(KEY, ("torch", "cuda"), engines.trial, dispatch.agree) == "torch"
    monkeypatch.setenv("PACKED_KERNELS_DISPATCH", "static")
    assert chooser.choose(KEY, ("torch", "cuda"), engines.trial, dispatch.agree) == "torch"
    assert engines.ran == []
    monkeypatch.setenv("PACKED_KERNELS_DISPATCH", "measure")
    assert chooser.choose(KEY, ("torch", "cuda"), engines.trial, dispatch.agree) == "cuda"
    monkeypatch.setenv("PACKED_KERNELS_DISPATCH", "static")  # static uses what was measured
    fresh = _dispatcher(tmp_path, monkeypatch, FakeEngines({}, {}))
    assert fresh.choose(KEY, ("torch", "cuda"), lambda e: 1 / 0, dispatch.agree) == "cuda"
    monkeypatch.setenv("PACKED_KERNELS_DISPATCH", "fastest")
    with pytest.raises(ValueError, match="PACKED_KERNELS_DISPATCH"):
        fresh.choose(KEY[:-1] + (1,), ("torch", "cuda"), engines.trial, dispatch.agree)


def test_agreement_is_judged_against_cudnn_with_nonfinite_values_exact():
    ref = torch.tensor([1.0, float("nan"), float("inf"), -4.0], dtype=torch.float16)
    assert dispatch.agree(ref.clone(), ref) is None
    assert dispatch.agree((ref + 0.001, None), (ref, None)) is None  # rounding: agrees
    off = ref.clone()
    off[0] = 1.5
    assert "max error" in dispatch.agree(off, ref)
    for bad in (torch.tensor([1.0, 0.0, float("inf"), -4.0]), torch.tensor([1.0, float("nan"), float("-inf"), -4.0])):
        assert dispatch.agree(bad.half(), ref) == "different non-finite values"
    assert "shape" in dispatch.agree(ref[:2], ref)
    assert dispatch.agree((ref, None), (ref, ref)) == "a missing output"


@pytest.fixture
def auto_on_the_cpu(tmp_path, monkeypatch):
    """backend "auto" between the torch engine and the CUDA C++ kernels on the emulator, with a
    fake timer that makes the emulator fastest: the conv ops decide as they would on a GPU."""
    require_backend("simt")
    monkeypatch.setenv("PACKED_KERNELS_CACHE_DIR", str(tmp_path))
    timings = {"torch": 9.0, "simt": 1.0}
    ran = []

    def trial_timer(run):
        run()
        return timings[ran[-1]]
    chooser = dispatch.Dispatcher(dispatch.JsonCache("dispatch"), timer=trial_timer,
                                  capturing=lambda: False)
    real_choose = chooser.choose

    def choose(key, engines, trial, agree):
        chooser.calls += 1
        return real_choose(key, engines, lambda e: ran.append(e) or trial(e), agree)
    chooser.calls = 0
    monkeypatch.setattr(chooser, "choose", choose)
    monkeypatch.setattr(dispatch, "DISPATCHER", chooser)
    monkeypatch.setattr(conv_engines, "_usable", lambda device, dtype: ("torch", "simt"))
    return chooser


def test_auto_decides_each_pass_when_the_op_runs(auto_on_the_cpu):
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    out = conv_ops._grouped_conv2d_op(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, "auto")
    out.backward(torch.ones_like(out))
    passes = sorted(row["key"].split("|")[0] for row in auto_on_the_cpu.report())
    assert passes == ["forward", "input_grad", "weight_grad"]
    assert {row["engine"] for row in auto_on_the_cpu.report()} == {"simt"}
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.conv2d(x64, w64, padding=1, groups=2)
    ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-4)


def test_fp32_decisions_are_kept_apart_by_the_tf32_switch(auto_on_the_cpu):
    """Every engine follows cuDNN's TF32 switch in fp32, so a decision measured with it on is
    not reused with it off (and back on, the first one is)."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    for allow in (True, False, True):
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=allow):
            conv_ops._grouped_conv2d_op(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, "auto")
    precisions = sorted(row["key"].split("|")[2] for row in auto_on_the_cpu.report())
    assert precisions == ["float32/ieee", "float32/tf32"]


def test_auto_under_torch_compile_decides_at_run_time(auto_on_the_cpu):
    torch._dynamo.reset()

    def f(x, w):
        return conv_ops._grouped_conv2d_op(x, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 2, "auto")
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    for _ in range(2):
        torch.testing.assert_close(compiled(x, w), F.conv2d(x, w, padding=1, groups=2),
                                   rtol=1e-4, atol=1e-4)
    assert auto_on_the_cpu.calls == 2  # once per run: nothing was decided while tracing


def test_auto_fused_conv_forward_and_backward_match_the_torch_engine(auto_on_the_cpu):
    torch.manual_seed(0)
    leaves = [torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.rand(4) + 0.5,
              torch.randn(4), torch.rand(6) + 0.5, torch.randn(2, 6, 5, 5)]

    def run(backend):
        x, w, s, b, out_s, r = [t.clone().requires_grad_() for t in leaves]
        out, mean, var = conv_ops._fused_conv2d_op(x, w, None, s, b, out_s, None, r, [1, 1],
                                                   [1, 1, 1, 1], [1, 1], 2, "relu", "relu", True,
                                                   backend)
        (out.sum() + (mean * var).sum()).backward()
        return [out, mean, var] + [t.grad for t in (x, w, s, b, out_s, r)]
    for got, want in zip(run("auto"), run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    passes = sorted(row["key"].split("|")[0] for row in auto_on_the_cpu.report())
    assert passes == ["fused_forward", "input_grad", "weight_grad"]
    assert {row["engine"] for row in auto_on_the_cpu.report()} == {"simt"}


def test_a_decision_asked_while_tracing_is_the_known_one_and_nothing_runs(auto_on_the_cpu):
    """Asked under torch.compile's tracing (fake tensors), a decision is the one already made
    (or cached), else cuDNN; no engine runs at trace time."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3)
    geometry = ([1, 1], [1, 1, 1, 1], [1, 1], 2)

    def decide(x, w):
        engine = conv_engines.auto_forward_engine(x, w, None, *geometry)
        return x * (2.0 if engine == "simt" else 3.0)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(decide, backend="aot_eager", fullgraph=True)(x, w), x * 3)
    assert auto_on_the_cpu.report() == []  # not measured while tracing
    assert conv_engines.auto_forward_engine(x, w, None, *geometry) == "simt"  # eager: measured
    torch._dynamo.reset()
    assert torch.equal(torch.compile(decide, backend="aot_eager", fullgraph=True)(x, w), x * 2)
