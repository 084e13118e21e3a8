"""Benchmark describe.py on CPU (a script, not a test).

    .venv/bin/python tests/bench_describe.py [--videos=24] [--reps=2]

1. describe throughput (videos/s, model load excluded) with background decode processes (decode_workers = 1, 2) vs
   decoding inline in the main process (decode_workers = 0), same process, same videos, interleaved reps, tiny random
   llava_onevision (tests/tiny.py). Also what decoding alone and generating alone cost, to read the ratio against:
   with enough cores the overlapped run approaches max(decode / workers, generate), inline is decode + generate.
2. the same with generation emulated as idle CPU time (a model on a GPU: the host waits), equal to the decode time:
   what background decoding buys when decoding is not competing with generation for the cores.
3. read_frames (seek per target) vs decoding every frame, 32 frames from a synthetic 5-minute video.
"""
import os
import statistics
import sys
import tempfile
import time

import av
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import describe  # noqa: E402
import records  # noqa: E402
import video  # noqa: E402
from tests.tiny import make_tiny_checkpoint  # noqa: E402
from video import read_frames  # noqa: E402


def write_clip(path, seconds, seed, size=(360, 640), fps=30, gop_s=2):
    """H.264 (x264 ultrafast, a keyframe every gop_s) of a scrolling gradient plus fixed noise."""
    h, w = size
    rng = np.random.default_rng(seed)
    ramp = (np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1, 3)).astype(np.float32)
    noise = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": str(gop_s * fps)}
        for i in range(int(seconds * fps)):
            image = (np.roll(ramp, 3 * i, axis=1) + np.zeros((h, 1, 3), np.float32)).astype(np.uint8) + noise
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def throughput(tmp, n_videos, reps):
    ckpt = make_tiny_checkpoint(os.path.join(tmp, "ckpt"))
    folder = os.path.join(tmp, "videos")
    os.makedirs(folder)
    for i in range(n_videos):
        write_clip(os.path.join(folder, f"clip{i:03d}.mp4"), seconds=10, seed=i)
    cfg = dict(describe.DEFAULTS, model=ckpt, videos=folder, num_frames=8, batch_size=4, max_new_tokens=32,
               progress=False)

    # the two halves alone: decode + preprocess every video inline, then generate on pre-decoded pixels
    from model import VLM
    from tokenizer import Tokenizer
    vlm, tok = VLM.from_pretrained(ckpt), Tokenizer.from_pretrained(ckpt)
    items = describe.find_videos(folder)
    args = (8, vlm.config.family, vlm.config.vision.image_size, 1024)
    t0 = time.perf_counter()
    pixels = [msg[1][0] for _, msg in video.decode_inline(items, video.decode_video, args)]
    t_decode = time.perf_counter() - t0
    prompt_ids = tok.video_prompt(describe.load_prompt(cfg["prompt"]),
                                       vlm.num_video_tokens(8))
    describe.describe_batch(vlm, tok, prompt_ids, torch.from_numpy(np.stack(pixels[:4])), max_new_tokens=32)  # warm
    t0 = time.perf_counter()
    for k in range(0, len(pixels), 4):
        describe.describe_batch(vlm, tok, prompt_ids, torch.stack([torch.from_numpy(p) for p in pixels[k:k + 4]]),
                                max_new_tokens=32)
    t_generate = time.perf_counter() - t0
    print(f"{n_videos} videos (10 s, 640x360, 30 fps, keyframe every 2 s), 8 frames each, batch 4, 32 new tokens: "
          f"decode+preprocess alone {n_videos / t_decode:.2f} videos/s ({t_decode:.1f} s), "
          f"generate alone {n_videos / t_generate:.2f} videos/s ({t_generate:.1f} s)")

    # the forkserver (imports torch + PyAV once per process, then forks workers in ms) starts on first use: warm it
    t0 = time.perf_counter()
    pool = video.DecodePool(items[:1], video.decode_video, args, workers=1)
    list(pool)
    print(f"first DecodePool in a process (forkserver start, imports): {time.perf_counter() - t0:.1f} s, once")
    rates = {w: [] for w in (0, 1, 2)}
    for rep in range(reps):
        for workers in rates:  # interleaved, so machine load drifts hit every setting alike
            out = os.path.join(tmp, f"out_{rep}_{workers}", "d.jsonl")
            t0 = time.perf_counter()  # end to end: listing, model load, decode, generate, writes
            summary = describe.run(dict(cfg, out=out, decode_workers=workers))
            rates[workers].append(round(n_videos / (time.perf_counter() - t0), 2))
            assert summary["done"] == n_videos and summary["failed"] == 0
    base = statistics.median(rates[0])
    for workers, r in rates.items():
        print(f"decode_workers={workers}: {statistics.median(r):.2f} videos/s (runs {r}), "
              f"{statistics.median(r) / base:.2f}x inline")


class WaitingModel:
    """Stands in for a model on an accelerator: generate() keeps the CPU idle for `seconds` per batch, as a host
    waiting on a GPU does, and returns one token per row. Only for the overlap measurement below."""

    def __init__(self, seconds, token):
        self.seconds, self.token, self.lm_head_weight = seconds, token, torch.zeros(1)

    def generate(self, prompts, **kwargs):
        time.sleep(self.seconds)
        return [[self.token] for _ in prompts]


def overlap(tmp, reps):
    """decode_workers vs inline when generation does not use the CPU (a GPU run): inline pays decode + generate,
    background workers hide decoding behind generation."""
    from tokenizer import Tokenizer
    ckpt, folder = os.path.join(tmp, "ckpt"), os.path.join(tmp, "videos")
    items, tok = describe.find_videos(folder), Tokenizer.from_pretrained(ckpt)
    args = (8, "llava_onevision", 35, 1024)
    t0 = time.perf_counter()
    list(video.decode_inline(items, video.decode_video, args))
    per_video = (time.perf_counter() - t0) / len(items)
    vlm = WaitingModel(4 * per_video, tok.encode("a")[0])  # generation as slow as decoding: the inline worst case
    rates = {w: [] for w in (0, 1, 2)}
    for rep in range(reps):
        for workers in rates:
            stream = (video.DecodePool(items, video.decode_video, args, workers, capacity=2 * 4 + workers)
                      if workers else video.decode_inline(items, video.decode_video, args))
            out, err = (records.Writer(os.path.join(tmp, f"ov{rep}{workers}{k}.jsonl")) for k in "de")
            t0 = time.perf_counter()
            counts = describe.describe(stream, vlm, tok, [1], "waiting", 8, out, err, 4, 32)
            rates[workers].append(round(len(items) / (time.perf_counter() - t0), 2))
            stream.close(), out.close(), err.close()
            assert counts["done"] == len(items)
    print(f"generation emulated as {vlm.seconds:.2f} s of idle CPU per batch of 4 (= measured decode time):")
    base = statistics.median(rates[0])
    for workers, r in rates.items():
        print(f"  decode_workers={workers}: {statistics.median(r):.2f} videos/s (runs {r}), "
              f"{statistics.median(r) / base:.2f}x inline")


def decode_all(path, num_frames):
    """Baseline: decode every frame in order, keep the one on screen at each of read_frames' targets."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_type = "AUTO"
        start, duration = stream.start_time or 0, stream.duration
        targets = [start + (2 * i + 1) * duration // (2 * num_frames) for i in range(num_frames)]
        picked, last, k, decoded = [], None, 0, 0
        for frame in container.decode(stream):
            decoded += 1
            while k < len(targets) and frame.pts > targets[k]:
                picked.append(last if last is not None else frame)
                k += 1
            last = frame
        picked += [last] * (len(targets) - len(picked))
        return np.stack([f.to_ndarray(format="rgb24") for f in picked]), decoded


def seeking(tmp):
    path = write_clip(os.path.join(tmp, "long.mp4"), seconds=300, seed=0)
    for _ in range(2):
        t0 = time.perf_counter()
        frames, info = read_frames(path, 32, max_side=None)
        t_seek = time.perf_counter() - t0
        t0 = time.perf_counter()
        baseline, decoded = decode_all(path, 32)
        t_all = time.perf_counter() - t0
        assert np.array_equal(frames, baseline), "read_frames and decode-all picked different frames"
        print(f"32 frames of a {info['duration']:.0f} s 640x360 30 fps clip (keyframe every 2 s): read_frames "
              f"{t_seek:.2f} s ({info['decoded_frames']} frames decoded, {info['seeks']} seeks), decode-all "
              f"{t_all:.2f} s ({decoded} frames), {t_all / t_seek:.1f}x")


if __name__ == "__main__":
    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.1f}")
        throughput(tmp, int(opts.get("videos", 24)), int(opts.get("reps", 2)))
        overlap(tmp, int(opts.get("reps", 2)))
        seeking(tmp)
