"""
bench.py throughput (a benchmark script, not a test): judged items/s against the loopback OpenAI server
(tests/fake_openai.py) with a fixed per-request latency, by concurrency; answer generation new tokens/s on the demo's
tiny model by batch size. Ratios are against the first setting, measured in the same process.

    .venv/bin/python tests/bench_judge.py [--latency=0.05] [--items=256]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import bench  # noqa: E402
from tests import fake_openai  # noqa: E402


def judge_throughput(n_items, latency, levels):
    proc, url = fake_openai.start(f"--latency={latency}")
    tmp = tempfile.mkdtemp()
    try:
        items = {f"h{i}": dict(id=f"h{i}", video="v.mp4", query=f"q{i}", category="violence", query_type="harmful",
                               rule="VIO-01") for i in range(n_items)}
        answers = {i: dict(id=i, answer=f"Sure, step {i}.", model="m") for i in items}
        out = []
        for c in levels:
            cfg = dict(bench.DEFAULTS, judge_url=url, judge_model="judge", concurrency=c, progress=False,
                       out_dir=os.path.join(tmp, f"c{c}"))
            os.makedirs(cfg["out_dir"])
            [client] = bench.judge_clients(cfg)
            try:
                t0 = time.perf_counter()
                counts = bench.run_judge(client, items, answers, cfg["out_dir"], cfg)
                dt = time.perf_counter() - t0
            finally:
                client.close()
            assert counts["judged"] == n_items, counts
            out.append((c, n_items / dt))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        shutil.rmtree(tmp)


def generation_throughput(batch_sizes, n_items, max_new_tokens):
    """On a tiny random checkpoint (tests/tiny.py) with a real tokenizer: answers differ in length across the batch."""
    from data.demo.scenes import render, variant, write_video
    from tests.tiny import make_tiny_checkpoint
    tmp = tempfile.mkdtemp()
    try:
        ckpt = make_tiny_checkpoint(os.path.join(tmp, "model"))
        write_video(os.path.join(tmp, "v.mp4"), render("kitchen_knife", variant("kitchen_knife", 0, 1, 0)))
        items = [dict(id=f"x{i}", video="v.mp4", query="What happens in this video?" + " Then?" * (i % 3),
                      category="violence", query_type="harmful") for i in range(n_items)]
        out = []
        for b in batch_sizes:
            cfg = dict(bench.DEFAULTS, model=ckpt, video_root=tmp, num_frames=8, max_new_tokens=max_new_tokens,
                       batch_size=b, progress=False, device="cpu", dtype="float32")
            r = bench.generate_answers(items, cfg, os.path.join(tmp, f"a{b}.jsonl"), os.path.join(tmp, f"e{b}.jsonl"))
            assert r["answered"] == n_items, r
            out.append((b, r["new_tokens"] / r["seconds"], r["new_tokens"]))
        return out
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--items", type=int, default=256)
    args = ap.parse_args()
    res = judge_throughput(args.items, args.latency, [1, 4, 16, 64])
    print(f"judge: {args.items} items, {1000 * args.latency:.0f} ms per request")
    for c, rate in res:
        print(f"  concurrency {c:3d}: {rate:7.1f} items/s  ({rate / res[0][1]:.1f}x)")
    gen = generation_throughput([1, 4, 8], 16, 32)
    print("generation (tiny random model, 8 frames, 32 new tokens max, 16 items):")
    for b, rate, n in gen:
        print(f"  batch_size {b}: {rate:7.1f} new tokens/s ({n} tokens, {rate / gen[0][1]:.1f}x)")
    print(json.dumps({"judge": res, "generation": gen}))
