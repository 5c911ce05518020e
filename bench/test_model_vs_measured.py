# SPDX-License-Identifier: Apache-2.0
"""bench/model_vs_measured.py: measured engine decisions joined with modelled conv layers."""

import json
from pathlib import Path

from bench import model_vs_measured
from bench.perf_model import conv_geometry, layers

H200_DISPATCH = Path(__file__).resolve().parent / "results" / "2026-12-04-nvidia-h200-dispatch" / "first-call"


def _decisions():
    (path,) = H200_DISPATCH.glob("dispatch-2*.json")  # the record, not the cache
    return json.loads(path.read_text())["rows"]


def _model(backend_us):
    """A model record with every PE-(2,4,1) conv layer and pass, each modelled at backend_us."""
    rows = [{"op": "conv", "layer": layer.name, "pass": p, "backend": b, "modelled_us": us,
             "geometry": conv_geometry(layer, 128)}
            for layer, _ in layers(("pe241",)) for p in ("forward", "input_grad", "weight_grad")
            for b, us in backend_us.items()]
    return {"dtype": "fp16", "gpu_name": "H200 SXM", "rows": rows}


def test_every_measured_decision_of_the_h200_run_meets_its_modelled_layer():
    decisions = _decisions()
    lines = model_vs_measured.join(_model({"triton": 10.0, "cuda": 20.0}), decisions)
    assert len(lines) == 2 * len(decisions)  # one per backend: every key matched exactly one layer
    by_key = {(x["layer"], x["pass"], x["backend"]): x for x in lines}
    assert len(by_key) == len(lines)
    some = decisions[0]
    pass_name = some["key"].split("|")[0]
    match = [x for x in lines if x["pass"] == pass_name and x["backend"] == "cuda"
             and x["measured_us"] == some["timings_us"]["cuda"]]
    assert match and match[0]["ratio"] == some["timings_us"]["cuda"] / 20.0
    assert match[0]["cudnn_us"] == some["timings_us"]["torch"]


def test_other_dtypes_and_layouts_do_not_join():
    decisions = [dict(d, key=d["key"].replace("float16", "bfloat16")) for d in _decisions()]
    decisions += [dict(d, key=d["key"].replace("channels_last", "nchw")) for d in _decisions()]
    assert model_vs_measured.join(_model({"triton": 1.0}), decisions) == []
    assert "no measured layer" in model_vs_measured.format_lines([], "H200")


def test_command_reads_the_records_folder(tmp_path, capsys):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(_model({"cuda": 50.0})))
    assert model_vs_measured.main([str(model), str(H200_DISPATCH)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("measured (GPU us per call") and "H200 SXM" in out[0]
    measured = [d for d in _decisions() if "cuda" in d["timings_us"]]
    assert len(out) == 2 + len(_decisions()) + 3  # + a geomean line per pass
    assert out[-1].startswith("geomean measured / modelled, cuda weight_grad:")
    ratios = model_vs_measured.summary(model_vs_measured.join(_model({"cuda": 50.0}), _decisions()))
    assert sum(n for _, n in ratios.values()) == len(measured)
