# SPDX-License-Identifier: Apache-2.0
"""`python -m bench overhead`: a real (short) measurement on the CPU; its targets are reported,
not asserted (a timed assertion would be flaky: the benchmark is the place for the figure)."""

import json

from bench import cli, overhead


def test_overhead_measures_every_case_against_its_torch_baseline(capsys, tmp_path):
    assert cli.main(["overhead", "--calls", "5", "--rounds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    record = json.loads(next(tmp_path.glob("overhead-*.json")).read_text())
    cases = [row["case"] for row in record["rows"]]
    assert cases == ["grouped_conv2d", "fused_conv2d_stats", "grouped_conv2d_train"]
    for row in record["rows"]:
        assert row["ours_us"] > 0 and row["torch_us"] > 0
        assert abs(row["extra_us"] - (row["ours_us"] - row["torch_us"])) < 1e-6
        assert row["target_us"] == overhead.TARGETS_US.get(row["case"])
        assert row["case"] in out
