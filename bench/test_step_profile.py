# SPDX-License-Identifier: Apache-2.0
"""`python -m bench profile`: a reduced real run on the CPU (the per-kernel table is GPU-only)."""

from bench import cli


def test_profile_reports_each_step_and_its_python_hot_spots(capsys):
    assert cli.main(["profile", "--rows", "pe241-packed_kernels", "--arch", "18", "--python-top", "5",
                     "--no-save"]) == 0
    out = capsys.readouterr().out
    for phase in ("train", "infer"):
        assert f"== pe241-packed_kernels {phase} (fp32, nchw, batch 2" in out
    hot_spots = [line for line in out.splitlines() if line.startswith("  ") and "(" in line
                 and line.split()[0].isdigit()]
    assert len(hot_spots) == 10  # five functions per step
