"""`lamamba bench table` (lamamba_dist/bench/table.py): the README's table from real `lamamba bench` JSON."""

import json

import pytest

from lamamba_dist.bench.table import render
from lamamba_dist.cli import main as cli_main


def test_table_pairs_each_variant_with_the_baseline_of_its_run(tmp_path, capsys):
    out = tmp_path / "b32.json"
    assert cli_main(["bench", "--models", "DiT-debug/2,LaMamba-debug,LaMamba-debug:snake=torch", "--resolution", "32",
                     "--batch", "2", "--steps", "1", "--warmup", "1", "--scan-backend", "reference",
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    capsys.readouterr()
    text = render([str(out)], commit="abc1234")
    assert "commit abc1234" in text and "b32.json" in text and "torch " in text
    lines = [line for line in text.splitlines() if line.startswith("| 32 px")]
    assert len(lines) == 2  # the two LaMamba variants, each against the run's eager DiT
    assert lines[0].startswith("| 32 px, batch 2, eager |") and lines[1].startswith("| 32 px, batch 2, eager, snake=torch |")
    for line, r in zip(lines, rows[1:]):
        assert f"{r['img_per_s'] / rows[0]['img_per_s']:.2f}x" in line and f"{r['img_per_s']:.1f}" in line
        assert f"{rows[0]['img_per_s']:.1f}" in line  # the DiT cell
    best = max(rows[1:], key=lambda r: r["img_per_s"])
    assert f"each model's fastest: {best['spec']} {best['img_per_s']:.1f} img/s against DiT-debug/2" in text
    # the CLI writes the same text
    md = tmp_path / "t.md"
    assert cli_main(["bench", "table", str(out), "--commit", "abc1234", "--out", str(md)]) == 0
    assert md.read_text() == text


def test_table_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"results": []}')
    with pytest.raises(SystemExit, match="bad.json: not a `lamamba bench` JSON file"):
        render([str(bad)])
    bad.write_text('{"environment": {}, "results": [{"model": "DiT-XL/2"}]}')
    with pytest.raises(SystemExit, match="result 0 has no resolution, batch, img_per_s"):
        render([str(bad)])


def test_readme_table_is_the_render_of_the_committed_bench_files():
    """The README's performance table is `lamamba bench table` of docs/bench/b256.json and b512.json (the runs it
    quotes), with the commit its header names: edited by hand or left behind by a new run, the two disagree."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    header = re.search(r"^One `lamamba bench` run per file \(b256\.json, b512\.json\);.* commit (\w+)\.$", readme, re.M)
    assert header, "README: no table header naming b256.json, b512.json and a commit"
    text = render([str(root / "docs" / "bench" / "b256.json"), str(root / "docs" / "bench" / "b512.json")],
                  commit=header.group(1))
    assert text.strip() in readme
