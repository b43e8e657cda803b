"""scripts/gpu_check_summary.py reads what scripts/gpu_check.sh's parts leave behind (CPU: synthetic stats files)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)


def _write(path: Path, recs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _resume_files(out: Path, killed_after: int, rerun_from: int = 51, resumed: str = "step_00000050") -> None:
    first = [{"step": s, "loss": 1.0 / s} for s in range(1, killed_after + 1)]
    second = [{"step": s, "loss": 1.0 / s * (1 + 1e-4)} for s in range(rerun_from, 71)]
    _write(out / "resume" / "stats.jsonl", first + [{"event": "checkpoint", "step": 50}] + second)
    (out / "resume_second.log").write_text(f"[lamamba train r0] resumed from /x/{resumed} (step 50)\n")
    (out / "resume_second.rc").write_text("0\n")


def test_resume_check_compares_the_steps_the_killed_run_logged_after_the_checkpoint(tmp_path):
    # killed later than step 60 (the step-50 save was published after it): steps 51..63 are compared
    _resume_files(tmp_path, killed_after=63)
    res = summary.resume(tmp_path, rtol=0.02, kill_at=60)
    assert res["ok"] and res["compared_steps"] == [51, 63] and res["resumed_from"] == "step_00000050"
    assert abs(res["max_rel_diff"] - 1e-4) < 1e-9
    # killed before step 60, or a rerun that started from scratch: not ok
    _resume_files(tmp_path, killed_after=58)
    assert not summary.resume(tmp_path, rtol=0.02, kill_at=60)["ok"]
    _resume_files(tmp_path, killed_after=60, rerun_from=1, resumed="nothing")
    res = summary.resume(tmp_path, rtol=0.02, kill_at=60)
    assert not res["ok"] and res["resumed_from"] is None


def test_background_save_windows_are_the_ones_written_during_the_write(tmp_path):
    """The windows after the save that ended before its write did, against those before it and those that started
    after the write ended; not the one holding the next save's wait."""
    win = lambda step, t, sps: {"step": step, "time": t, "sec_per_step": sps, "img_per_s": 32 / sps}  # noqa: E731
    recs = [win(10, 10.0, 0.5), win(20, 12.0, 0.2), win(30, 14.0, 0.2), win(40, 16.0, 0.2),
            win(50, 18.1, 0.21), win(60, 20.2, 0.21), win(70, 22.3, 0.21), win(80, 24.4, 0.21),
            {"event": "checkpoint", "step": 40, "blocked_s": 0.25, "wait_s": 0.0, "write_ended": 30.0,
             "time": 36.0},
            win(90, 36.5, 1.2)]  # the step-80 save waited for the step-40 one: not a window of the write
    _write(tmp_path / "ckpt" / "stats.jsonl", recs)
    res = summary.background_save(tmp_path)
    assert res["compared"] == {"before": [20, 30, 40], "during": [50, 60, 70, 80], "after": []}
    assert abs(res["img_per_s_ratio"] - 0.2 / 0.21) < 1e-9 and res["ok"]
    # a save that blocked training for longer than the threshold fails
    recs[8]["blocked_s"] = 3.5
    _write(tmp_path / "ckpt" / "stats.jsonl", recs)
    assert not summary.background_save(tmp_path)["ok"]


def test_background_save_compares_to_windows_before_and_after_the_write(tmp_path):
    """A machine that slows down over the run: the write's windows are compared to both sides (the ratio to the
    windows before alone would blame the write for the drift). The window straddling the write's end is in
    neither side, and a window at or after the next save is left out."""
    win = lambda step, t, sps: {"step": step, "time": t, "sec_per_step": sps, "img_per_s": 32 / sps}  # noqa: E731
    recs = [win(10, 5.0, 0.5), win(20, 7.0, 0.20), win(30, 9.0, 0.20),  # before (10: warm-up)
            win(40, 11.2, 0.22), win(50, 13.4, 0.22),  # during (the write ends at 13.5)
            win(60, 15.7, 0.23),  # started before the write ended, ended after: neither side
            {"event": "checkpoint", "step": 30, "blocked_s": 0.3, "wait_s": 0.0, "write_ended": 13.5, "time": 15.8},
            win(70, 18.1, 0.24), win(80, 20.5, 0.24),  # after
            {"event": "checkpoint", "step": 90, "blocked_s": 0.3, "wait_s": 0.0, "write_ended": 30.0, "time": 31.0},
            win(90, 22.9, 0.24), win(100, 26.0, 0.31)]  # from the next save on: left out
    _write(tmp_path / "ckpt" / "stats.jsonl", recs)
    res = summary.background_save(tmp_path)
    assert res["compared"] == {"before": [20, 30], "during": [40, 50], "after": [70, 80]}
    assert abs(res["img_per_s_ratio"] - 0.22 / 0.22) < 1e-9 and res["ok"]
    assert abs(res["img_per_s_ratio_to_before"] - 0.20 / 0.22) < 1e-9
    assert abs(res["img_per_s_ratio_to_after"] - 0.24 / 0.22) < 1e-9


def test_source_digest_follows_the_code_and_ignores_caches(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "lamamba_dist" / "__pycache__").mkdir(parents=True)
    (tmp_path / "lamamba_dist" / "a.py").write_text("x = 1\n")
    d0 = summary.source_digest(tmp_path)
    (tmp_path / "lamamba_dist" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0")
    assert summary.source_digest(tmp_path) == d0
    (tmp_path / "lamamba_dist" / "a.py").write_text("x = 2\n")
    assert summary.source_digest(tmp_path) != d0


def test_ratios_take_the_mean_of_model_rows_run_before_and_after_the_trainer(tmp_path):
    """ABA=1: bench_<mode>.json and bench_<mode>_after.json; the ratio is to their mean, the drift reported."""
    row = lambda ms: {"model": "M", "batch": 32, "step_ms": ms, "img_per_s": 32e3 / ms}  # noqa: E731
    (tmp_path / "bench_eager.json").write_text(json.dumps({"results": [row(100.0)]}))
    train = {"results": [{"model": "M", "micro_batch": 32, "step_ms": 105.0, "img_per_s": 32e3 / 105, "error": None}]}
    (tmp_path / "train_eager.json").write_text(json.dumps(train))
    res = summary.ratios(tmp_path, "eager")
    assert abs(res["rows"][0]["train_over_bench"] - 1.05) < 1e-9 and "bench_drift" not in res["rows"][0]
    (tmp_path / "bench_eager_after.json").write_text(json.dumps({"results": [row(110.0)]}))
    r = summary.ratios(tmp_path, "eager")["rows"][0]
    assert r["bench_step_ms_each"] == [100.0, 110.0] and abs(r["bench_drift"] - 1.1) < 1e-9
    assert abs(r["train_over_bench"] - 1.0) < 1e-9 and abs(r["bench_step_ms"] - 105.0) < 1e-9


def test_the_check_in_two_calls_summarizes_both_phases(tmp_path):
    """PHASES=1 then PHASES=2 into one folder (the two device calls on an 80 GB card): the second call keeps the
    first one's timeline and results and summarizes them. Every part off, so this runs on CPU in seconds."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "TESTS": "0", "RESUME": "0", "EAGER": "0", "COMPILED": "0"}
    script = str(ROOT / "scripts" / "gpu_check.sh")
    out = tmp_path / "gc"
    subprocess.run(["bash", script, str(out)], env={**env, "PHASES": "1"}, check=True, capture_output=True, timeout=120)
    first = (out / "timeline.txt").read_text().splitlines()
    assert first[-1].endswith("s summary") and not any("timed rows" in line for line in first)
    _resume_files(out, killed_after=60)  # stands for the first call's resume run
    r = subprocess.run(["bash", script, str(out)], env={**env, "PHASES": "2"}, check=True, capture_output=True,
                       text=True, timeout=120)
    timeline = (out / "timeline.txt").read_text().splitlines()
    assert timeline[:len(first)] == first  # the first call's marks are kept
    assert "0s phase 2 (phase 1's results from an earlier call)" in timeline and "timed rows start" in timeline[-2]
    res = json.loads((out / "summary.json").read_text())
    assert res["resume"]["ok"] and res["timeline"] == timeline and r.stdout.rstrip().endswith("}")
