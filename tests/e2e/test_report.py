"""`lamamba report`: the HTML page and PNGs of a run folder, checked for what they show."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")


def _run_folder(tmp_path: Path) -> Path:
    """A run that logged 40 steps, resumed once, skipped one non-finite step, saved twice, and was requeued by Slurm;
    its stats.jsonl ends with a half-written line (a live run)."""
    from PIL import Image

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "slurm").mkdir()
    t0 = 1_790_000_000.0
    lines = []
    for step in range(1, 41):
        lines.append({"step": step, "images_seen": 256 * step, "loss": 1.0 / step, "grad_norm": 2.0 + step % 3,
                      "lr": 1e-4, "img_per_s": 100.0 + step, "mfu": 0.05, "peak_mem_gib": 20.0 + step / 100,
                      "data_wait": 0.01, "time": t0 + 10 * step})
        if step == 10:
            lines.append({"event": "checkpoint", "step": 10, "dir": "step_00000010", "background": True,
                          "blocked_s": 0.8, "wait_s": 0.0, "write_s": 21.5, "gib": 11.0, "files_gib": 10.9,
                          "time": t0 + 10 * step + 5})
        if step == 15:
            lines.append({"event": "nonfinite", "step": 15, "what": "loss", "in_row": 1, "keys": [], "time": t0 + 151})
        if step == 20:
            lines.append({"event": "resume", "step": 10, "from": "step_00000010", "world_size": 16, "host": "gpu-a7",
                          "slurm_job_id": "4242", "images_seen": 2560, "time": t0 + 201})
        if step == 30:
            lines.append({"event": "checkpoint", "step": 30, "dir": "step_00000030", "background": False,
                          "blocked_s": 24.0, "wait_s": 1.5, "write_s": 0.0, "gib": 11.0, "files_gib": 10.9,
                          "time": t0 + 10 * step + 30})
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 41, "images_se'  # the writer is mid-line
    (run / "stats.jsonl").write_text(text)
    (run / "slurm" / "events.jsonl").write_text(
        json.dumps({"event": "stop", "job_id": "4241", "restart": 0, "reason": "preempted", "time": t0 + 195}) + "\n"
        + json.dumps({"event": "requeue", "job_id": "4241", "restart": 0, "time": t0 + 196}) + "\n")
    grid = np.zeros((64, 96, 3), np.uint8)
    grid[:, :48] = (200, 30, 30)
    Image.fromarray(grid).save(run / "samples" / "step_00000040.png")
    return run


def _png(data: bytes):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.float32)


def test_report_shows_the_runs_curves_grids_and_timeline(tmp_path):
    from lamamba_dist.cli import main as cli

    run = _run_folder(tmp_path)
    out = tmp_path / "report"
    assert cli(["report", str(run), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    s = rep["summary"]
    assert s["last_step"] == 40 and s["kimg"] == pytest.approx(10.24) and s["skipped_lines"] == 1
    assert s["checkpoints"] == 2 and s["checkpoint_blocked_s"] == pytest.approx(0.8 + 25.5)
    assert s["resumes"] == 1 and s["nonfinite_steps"] == 1 and s["slurm_events"] == 2
    assert s["median_img_per_s"] == pytest.approx(121.0) and s["peak_mem_gib"] == pytest.approx(20.4)
    # the curves are the logged values, step by step
    assert rep["series"]["loss"] == [[st, 1.0 / st] for st in range(1, 41)]
    assert [v for _, v in rep["series"]["img_per_s"]] == [100.0 + st for st in range(1, 41)]
    assert rep["series"]["fid"] == [] and "fid" not in rep["figures"]

    names = {"loss", "grad_norm", "throughput", "memory", "lr", "timeline"}
    assert set(rep["figures"]) == names
    for name in names:
        img = _png((out / f"{name}.png").read_bytes())
        assert img.shape == (340, 750, 3), (name, img.shape)
        ink = (img.std(axis=2) > 40).mean()  # coloured pixels: the plotted lines and markers, not a blank frame
        assert ink > 0.001, (name, ink)
    timeline = _png((out / "timeline.png").read_bytes())
    for kind, rgb in {"checkpoint": (44, 160, 44), "resume": (31, 119, 180), "nonfinite": (214, 39, 40),
                      "slurm": (255, 127, 14)}.items():  # matplotlib's C2, C0, C3, C1: one marker colour per kind
        assert (np.abs(timeline - np.array(rgb)).max(axis=2) < 30).sum() > 20, kind

    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(names) + 1  # every figure and the sample grid, inline
    grid = [_png(base64.b64decode(b)) for b in embedded if _png(base64.b64decode(b)).shape[:2] == (64, 96)]
    assert len(grid) == 1 and grid[0][0, 0].tolist() == [200, 30, 30]
    rows = re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    whats = [w for w, _ in rows]
    assert whats == ["checkpoint step_00000010", "non-finite step skipped", "slurm: stop", "slurm: requeue",
                     "resume from step_00000010", "checkpoint step_00000030"], whats
    details = dict(rows)
    assert "background: training blocked 0.80 s, written in 21.5 s, 10.90 GiB" in details["checkpoint step_00000010"]
    assert "synchronous: training blocked 25.50 s" in details["checkpoint step_00000030"]
    assert "16 rank(s) on gpu-a7, Slurm job 4242" in details["resume from step_00000010"]
    assert "reason preempted" in details["slurm: stop"]


def test_report_of_a_folder_without_stats_is_a_clear_error(tmp_path, capsys):
    from lamamba_dist.cli import main as cli

    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: no stats.jsonl" in err and "Traceback" not in err, err
