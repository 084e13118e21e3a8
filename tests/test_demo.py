"""The demo's wiring end to end: `make demo-steps` (the recipe `make demo` runs) on 4 videos with 2 DPO steps, then
the closing table. Catches a step whose flags or file names drifted from the others'.
Run: .venv/bin/python -m pytest -q tests/test_demo.py"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_demo_steps(tmp_path):
    out = str(tmp_path / "demo")
    cmd = ["make", "--no-print-directory", "-C", REPO, "demo-steps", f"PY={sys.executable}", f"DEMO={out}",
           "DEMO_VIDEOS=4", "DPO_ARGS=--max_iters=2 --eval_interval=2 --save_interval=2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for path in ("descriptions.jsonl", "pairs.train.jsonl", "pairs.heldout.jsonl", "dpo/final/model.safetensors",
                 "bench_base/report.md", "bench_dpo/summary.json", "bench_cmp/compare.json", "gold.jsonl",
                 "bench_gold/calibration.png"):
        assert os.path.isfile(os.path.join(out, path)), f"the demo did not write {path}"
    steps = [json.loads(line) for line in open(os.path.join(out, "dpo", "metrics.jsonl")) if '"loss"' in line]
    assert [m["step"] for m in steps] == [1, 2]
    assert "pairs made" in run.stdout and "after DPO" in run.stdout and "report" in run.stdout
    # every held-out item was answered by both models and judged (the offline judge never errs)
    for run_dir in ("bench_base", "bench_dpo"):
        summary = json.load(open(os.path.join(out, run_dir, "summary.json")))
        assert summary["judged"] == summary["items"] > 0 and summary["judge_error"] == 0
