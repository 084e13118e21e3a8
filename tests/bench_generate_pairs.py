"""
Benchmark of generate_pairs.py + llm.py against the loopback fake server (tests/fake_openai.py) with a fixed
per-request latency: pairs/s and calls/s vs `concurrency`, the client's overhead per call, and a projection for
350,000 pairs. A script, not a test (pytest does not collect bench_*.py):

    .venv/bin/python tests/bench_generate_pairs.py [--latency=0.1] [--concurrency=1,2,4,8,16,32,64] [--q=4]

Overhead: with concurrency 1 each worker's calls are sequential, so wall/calls - latency is what one call costs on
top of the endpoint's time: the client (request building, JSON, validation, SQLite put, JSONL write) plus the fake
server's own Python handling and loopback HTTP, i.e. an upper bound on the client's share. A second measurement
with latency 0 isolates it further.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate_pairs as gp  # noqa: E402
from tests import fake_openai  # noqa: E402
from tests.test_generate_pairs import write_descriptions  # noqa: E402


def measure(url, n, concurrency, q, tmp):
    """One generate_pairs run over n fresh descriptions; returns (seconds, pairs, calls, client CPU seconds).
    The fake server is another process, so this process's CPU time is the client's (and generate_pairs') own."""
    os.makedirs(tmp, exist_ok=True)
    cfg = {k: v for k, v in vars(gp).items() if not k.startswith("_") and k.islower()
           and isinstance(v, (int, float, bool, str))}
    cfg.update(descriptions=write_descriptions(os.path.join(tmp, "d.jsonl"), n), out=os.path.join(tmp, "p.jsonl"),
               llm_url=url, llm_model="fake-model", concurrency=concurrency, queries_per_video=q, backoff_base=0.01)
    devnull, sys.stdout = sys.stdout, open(os.devnull, "w")  # run() prints its summary
    try:
        t, cpu = time.perf_counter(), time.process_time()
        code, summary = gp.run(cfg)
        dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    finally:
        sys.stdout.close()
        sys.stdout = devnull
    assert code == 0, summary
    calls = sum(u["calls"] for u in summary["usage"].values())
    return dt, summary["new_pairs"], calls, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--q", type=int, default=4, help="queries_per_video")
    ap.add_argument("--seconds", type=float, default=4.0, help="target duration of each run")
    ap.add_argument("--real_latency", type=float, default=2.0, help="projection: mean seconds per real call")
    ap.add_argument("--real_concurrency", type=int, default=64, help="projection: concurrent streams served")
    args = ap.parse_args()
    q = args.q
    calls_per_desc = 2 + 3 * q  # rules, queries, then chosen + rejected + verify per query
    tmp = tempfile.mkdtemp(prefix="bench_pairs_")
    proc, url = fake_openai.start(f"--latency={args.latency}")
    proc0, url0 = fake_openai.start("--latency=0")
    try:
        print(f"fake server latency {args.latency * 1000:.0f} ms/call, queries_per_video={q} "
              f"({calls_per_desc} calls per description, run one after another by one worker)")
        print(f"{'concurrency':>11} {'descs':>6} {'calls':>6} {'s':>6} {'calls/s':>8} {'pairs/s':>8} "
              f"{'speedup':>8} {'ideal':>6} {'wall overhead/call':>20} {'client CPU/call':>16}")
        base = None
        for c in [int(x) for x in args.concurrency.split(",")]:
            # the same number of descriptions per worker (no tail where some workers idle), ~args.seconds at ideal
            n = c * max(2, round(args.seconds / (calls_per_desc * args.latency)))
            dt, pairs, calls, cpu = measure(url, n, c, q, os.path.join(tmp, f"c{c}"))
            rate = pairs / dt
            base = base or rate
            overhead = dt * c / calls - args.latency  # per call, per worker, beyond the endpoint's latency
            # (includes run()'s fixed setup: taxonomy, templates, SQLite open, summary; ~50 ms in total)
            print(f"{c:>11} {n:>6} {calls:>6} {dt:>6.2f} {calls / dt:>8.1f} {rate:>8.2f} {rate / base:>8.2f} "
                  f"{c:>6} {overhead * 1000:>8.2f} ms ({100 * overhead / args.latency:4.1f}%) "
                  f"{cpu / calls * 1000:>8.2f} ms ({100 * cpu / calls / args.latency:.1f}%)")
        dt, pairs, calls, cpu = measure(url0, 50, 1, q, os.path.join(tmp, "zero"))
        print(f"latency 0, concurrency 1: {calls} calls in {dt:.2f} s = {1000 * dt / calls:.2f} ms per call "
              f"(client + fake server + loopback HTTP), of which client CPU {1000 * cpu / calls:.2f} ms")
        per_pair = (2 + 3 * q) / q  # calls per pair
        wall = 350_000 * per_pair * args.real_latency / args.real_concurrency
        print(f"projection: 350,000 pairs x {per_pair:.2f} calls/pair x {args.real_latency} s/call / "
              f"{args.real_concurrency} concurrent streams = {wall / 3600:.1f} h (assumes no drops and an endpoint "
              f"that sustains {args.real_concurrency} streams at {args.real_latency} s mean latency)")
    finally:
        for p in (proc, proc0):
            p.terminate()
            p.wait(timeout=60)


if __name__ == "__main__":
    main()
