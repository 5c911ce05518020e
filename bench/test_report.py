# SPDX-License-Identifier: Apache-2.0
"""`python -m bench report` on recorded fixtures (real CPU records in bench/fixtures/)."""

import json
from pathlib import Path

import pytest

from bench import cli, records, table

FIXTURES = Path(__file__).parent / "fixtures"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["report", str(FIXTURES), "--out", str(out)]) == 0
    return out


def test_report_writes_markdown_and_every_plot(generated):
    names = {p.name for p in generated.iterdir()}
    assert "report.md" in names
    for suffix in ("-throughput.png", "-conv-speedup.png", "-roofline.png"):
        pngs = [generated / n for n in names if n.endswith(suffix)]
        assert len(pngs) == 1, suffix
        data = pngs[0].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000  # a drawn figure, not an empty file
    md = (generated / "report.md").read_text()
    for name in names - {"report.md"}:
        assert f"]({name})" in md  # every plot is linked from the report


def test_table_section_matches_the_record(generated):
    md = (generated / "report.md").read_text()
    rec = json.loads((FIXTURES / "table.json").read_text())
    assert "CPU numbers" in md
    for r in rec["rows"]:
        line = next(l for l in md.splitlines()
                    if l.startswith(f"| {table.row_label(r)} | {r['precision']} |"))
        assert r["device"] in line
        if "error" in r:
            assert "failed" in line
            continue
        assert f"{r['train_epoch']['median']:.2f} [" in line
        ref = table._reference(rec["rows"], r["precision"])
        assert f"{ref['train_epoch']['median'] / r['train_epoch']['median']:.2f}×" in line
        p_train, _ = table.paper_ratios(r["model"], r["precision"])
        assert f"{p_train:.2f}×" in line


def test_conv_and_ensemble_sections(generated):
    md = (generated / "report.md").read_text()
    conv = json.loads((FIXTURES / "conv.json").read_text())
    from bench import conv_sweep
    for s in conv_sweep.speedups(conv["rows"]):
        assert any(l.startswith(f"| {s['layer']} | {s['dtype']} | {s['layout']} | {s['pass']} |")
                   and f"({s['backend']})" in l and f"{s['speedup']:.2f}×" in l for l in md.splitlines())
    ens = json.loads((FIXTURES / "ensemble.json").read_text())
    for r in ens["rows"]:
        assert any(l.startswith(f"| {r['op']} | {r['backend']} |") and f"{r['gbps']:.1f}" in l
                   for l in md.splitlines())


def test_bn_section(generated):
    md = (generated / "report.md").read_text().splitlines()
    rec = json.loads((FIXTURES / "bn.json").read_text())
    for r in rec["rows"]:
        shape = "×".join(map(str, r["shape"]))
        assert any(l.startswith(f"| {shape} | {r['dtype']} | {r['layout']} | {r['pass']} | {r['impl']} |")
                   and f"{r['gbps']:.1f}" in l for l in md)
    from bench.bn import block_speedups
    for sp in block_speedups(rec["block_rows"]):
        assert any(f"{sp['layout']}, {sp['pass']}: **{sp['speedup']:.2f}×**" in l for l in md)


def test_fixtures_are_valid_records():
    recs = records.load_records([FIXTURES])
    assert sorted(r["kind"] for r in recs) == ["bn", "conv", "ensemble", "table"]
    for r in recs:
        assert {"device", "torch", "triton", "cudnn", "commit"} <= set(r["env"])


def test_report_without_records_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match="no records"):
        cli.main(["report", str(tmp_path)])
