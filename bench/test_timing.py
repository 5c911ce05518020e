# SPDX-License-Identifier: Apache-2.0
"""The timing and record helpers every benchmark relies on."""

import json

import pytest
import torch

from bench import records
from bench.timing import Stats, measure, rotation_count, summarize


def test_summarize_quartiles_and_median():
    stats = summarize([5.0, 1.0, 4.0, 2.0, 3.0], "wall")
    assert (stats.q1, stats.median, stats.q3, stats.min, stats.n) == (2.0, 3.0, 4.0, 1.0, 5)
    one = summarize([0.5], "wall")
    assert one.q1 == one.median == one.q3 == 0.5
    with pytest.raises(ValueError):
        summarize([], "wall")


def test_measure_excludes_warmup_and_rotates_indices():
    calls = []
    stats = measure(calls.append, "cpu", warmup=3, reps=7)
    assert calls == list(range(10))  # warm-up calls 0..2, then timed calls 3..9 with fresh indices
    assert stats.n == 7 and stats.clock == "wall"
    assert stats.min <= stats.q1 <= stats.median <= stats.q3


def test_measure_time_cap_cuts_timed_calls_but_keeps_minimum():
    import time
    stats = measure(lambda i: time.sleep(0.02), "cpu", warmup=1, reps=50, max_seconds=0.05, min_reps=3)
    assert stats.n == 3
    assert stats.median >= 0.02


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure(lambda i: None, "cpu", reps=0)


def test_stats_scaled_and_rate():
    s = Stats(median=0.5, q1=0.25, q3=1.0, min=0.2, n=4, clock="wall")
    assert s.scaled(10).median == 5.0
    rate = s.rate(100)
    assert rate == {"median": 200.0, "q1": 100.0, "q3": 400.0}


def test_rotation_exceeds_cache():
    n = rotation_count(8 << 20, "cpu")  # 8 MiB inputs, 64 MiB assumed cache, 3x margin
    assert n * (8 << 20) > 3 * (64 << 20)
    assert rotation_count(1 << 40, "cpu") == 2


def test_record_round_trip(tmp_path):
    rec = records.make_record("ensemble", torch.device("cpu"), {"batch": 3}, [{"op": "x"}])
    for key in ("device", "torch", "triton", "cudnn", "commit", "driver", "gpu"):
        assert key in rec["env"]
    path = records.write_record(rec, tmp_path)
    second = records.write_record(rec, tmp_path)
    assert path != second  # never overwrites an earlier record
    (tmp_path / "other.json").write_text(json.dumps({"benchmarks": []}))  # pytest-benchmark output
    loaded = records.load_records([tmp_path])
    assert [r["kind"] for r in loaded] == ["ensemble", "ensemble"]
    assert loaded[0]["rows"] == [{"op": "x"}]
    with pytest.raises(ValueError):
        records.make_record("nope", torch.device("cpu"), {}, [])


def test_cpu_runs_go_to_the_ignored_folder():
    assert records.run_dir(torch.device("cpu")).parent == records.SMOKE_DIR
    assert records.run_dir(torch.device("cpu"), record=True).parent == records.RESULTS_DIR
