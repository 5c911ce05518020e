# SPDX-License-Identifier: Apache-2.0
"""`python -m bench dispatch`: on the CPU nothing is measured (auto is the torch engine there),
which the report says; the report's format from decisions as a GPU makes them."""

from bench import cli, dispatch_report


def test_cpu_run_says_nothing_was_measured(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PACKED_KERNELS_CACHE_DIR", str(tmp_path))
    assert cli.main(["dispatch", "--arch", "18", "--no-save"]) == 0
    assert "no engine decisions on cpu" in capsys.readouterr().out


def test_report_lists_each_decision_with_its_times_and_rejections():
    rows = [{"key": "forward|NVIDIA H200|float16|channels_last|(128, 32, 3, 3)|4|(1, 1)|(1, 1, 1, 1)|"
                    "(1, 1)|131072|torch=2.11,triton=3.6", "engine": "triton", "source": "measured",
             "timings_us": {"torch": 40.0, "triton": 25.5}, "rejected": {"cuda": "max error 1 > 0.01"}},
            {"key": "weight_grad|NVIDIA H200|float16|channels_last|(256, 64, 1, 1)|4|(1, 1)|(0, 0, 0, 0)|"
                    "(1, 1)|32768|-|torch=2.11", "engine": "torch", "source": "cache",
             "timings_us": {"torch": 10.0, "triton": 12.0, "cuda": 30.0}, "rejected": {}}]
    text = dispatch_report.format_report(rows, "cuda:NVIDIA H200")
    lines = text.splitlines()
    assert lines[2].split()[:4] == ["triton", "40.0", "25.5", "-"]
    assert "(128, 32, 3, 3)" in lines[2] and "cuda: max error" in lines[2]
    assert "NVIDIA H200|" not in lines[2]  # the GPU is in the title, not on every line
    assert lines[3].split()[:4] == ["torch", "10.0", "12.0", "30.0"]
    assert lines[-1] == "decisions per engine: torch 1, triton 1"
