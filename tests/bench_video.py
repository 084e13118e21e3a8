"""read_frames against the naive baseline (decode every frame, keep those displayed at the targets) on one video,
interleaved in one process (`runs` times each; the speed-up range is over the runs):

    .venv/bin/python tests/bench_video.py [video_path] [--seconds=60] [--runs=3]

Without a path, a synthetic `seconds`-long 640x360 30 fps H.264 clip with a keyframe every 2 s is written first
(x264 ultrafast: no B-frames, so every frame is a reference)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import av  # noqa: E402
import numpy as np  # noqa: E402

from video import _duration, read_frames  # noqa: E402

if __name__ == "__main__":
    import sys
    import tempfile
    import time

    opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    seconds, runs = int(opts.get("seconds", 60)), int(opts.get("runs", 3))
    if paths:
        path = paths[0]
    else:
        path = os.path.join(tempfile.mkdtemp(), "synthetic.mp4")
        h, w, fps = 360, 640, 30
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        with av.open(path, "w") as out:
            stream = out.add_stream("libx264", rate=fps)
            stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
            stream.options = {"preset": "ultrafast", "g": str(2 * fps)}
            noise = np.random.default_rng(0).integers(0, 40, (h, w, 3), dtype=np.uint8)
            for i in range(seconds * fps):  # a scrolling ramp plus fixed noise: cheap to make, not trivial to code
                image = (np.roll(ramp, 4 * i, axis=1) + np.zeros((h, 1, 3), np.float32)).astype(np.uint8) + noise
                out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            out.mux(stream.encode())

    def decode_all(path, num_frames):
        """Baseline: decode every frame in order, keep the one on screen at each target."""
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_type = "AUTO"
            start, duration = stream.start_time or 0, _duration(container, stream)
            targets = [start + (2 * i + 1) * duration // (2 * num_frames) for i in range(num_frames)]
            picked, last, k = [], None, 0
            for frame in container.decode(stream):
                while k < len(targets) and frame.pts > targets[k]:
                    picked.append(last if last is not None else frame)
                    k += 1
                last = frame
            picked += [last] * (len(targets) - len(picked))
            return np.stack([f.to_ndarray(format="rgb24") for f in picked])

    print(f"{path}, load average {os.getloadavg()[0]:.1f}")
    for num_frames in (8, 32):
        speedups = []
        for run in range(runs):
            t0 = time.perf_counter()
            frames, info = read_frames(path, num_frames, max_side=None)
            ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            baseline = decode_all(path, num_frames)
            naive = time.perf_counter() - t0
            assert np.array_equal(frames, baseline), "read_frames and the decode-all baseline picked different frames"
            speedups.append(naive / ours)
            print(f"num_frames={num_frames:3d}: read_frames {ours:6.2f} s ({info['decoded_frames']} frames decoded, "
                  f"{info['seeks']} seeks) | decode-all {naive:6.2f} s | speed-up {naive / ours:5.1f}x "
                  f"| video {info['duration']:.0f} s at {info['fps']:.0f} fps, {info['original_size']}")
        print(f"num_frames={num_frames:3d}: speed-up {min(speedups):.1f}-{max(speedups):.1f}x over {runs} runs")
