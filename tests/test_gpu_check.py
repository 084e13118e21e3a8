"""tests/gpu_check.py, the one GPU check, as a dry run on CPU: every step at toy shapes with the Triton kernels under
the interpreter, the table and JSON complete; and a parity miss stops it before any timing is taken."""
import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, os.path.join(TESTS, "gpu_check.py"), "--tiny=True", f"--out={out}"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tiny"] is True and result["parity"] and all(r["ok"] for r in result["parity"])
    kernels = {r["kernel"] for r in result["parity"]}
    assert kernels == {"attention", "fused_logprobs"}
    layouts = {(r["dtype"], r["layout"], r["causal"]) for r in result["parity"] if r["kernel"] == "attention"}
    assert len(layouts) == 8  # fp32 and bf16, each: causal, pair, grouped rows, bidirectional
    impls = {(r["mask"], r["impl"]) for r in result["attention"] if "error" not in r}
    assert {("causal", "triton"), ("causal", "sdpa"), ("pair90", "triton"), ("pair_vs_duplicated", "triton")} <= impls
    assert result["logprobs"]["peaks"] and result["logprobs"]["fused_s"] > 0
    assert result["dpo_layers"]["tokens_per_s"] > 0 and result["generate"]["decode_tokens_per_s"] > 0
    assert len(result["table"]) == 10 and all("verdict" in r for r in result["table"])
    assert "TINY DRY RUN" in run.stdout


def test_parity_miss_stops_before_timings(tmp_path, monkeypatch):
    import gpu_check
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(gpu_check, "_check_parity", lambda *a, **k: (False, [dict(kernel="attention", ok=False)]))
    timed = []
    monkeypatch.setattr(gpu_check, "_bench_attention", lambda *a, **k: timed.append(a))
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit, match="parity FAILED"):
        gpu_check.main(dict(out=str(out), tiny=True, gen_layers=1, gen_batch=1, gen_new_tokens=2, dpo_layers=1))
    assert not timed
    result = json.loads(out.read_text())
    assert result["parity"] == [dict(kernel="attention", ok=False)] and "attention" not in result
