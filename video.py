"""
Video input with PyAV: pick N frames uniformly in time, then preprocess them into the pixel tensor a model family
expects (the hub processors' settings).

    frames, info = read_frames("clip.mp4", num_frames=8)        # uint8 (8, H, W, 3), displayed orientation
    pixel_values = preprocess(frames, "llava_onevision", 384)  # float32 (8, 3, 384, 384)

Sampling policy (read_frames). The stream covers [start, start + D) in its own timestamps. Target i of N is the
midpoint of segment i, t_i = start + (i + 1/2)·D/N, and takes the frame *on screen* at t_i: the last frame whose pts
is ≤ t_i (the first frame, if t_i precedes it). Only timestamps are used, never frame index × fps, so variable frame
rate is handled. A clip with fewer frames than N repeats frames (`info["unique_frames"]` counts the distinct ones).

Decoding. Targets are visited in time order. For each one the decoder either keeps going forward (when no keyframe
lies between the current position and the target, per the container's index; without an index, when the target is
less than `seek_gap` seconds ahead) or seeks to the keyframe at or before the target and decodes forward from there.
So at most about one GOP is decoded per target, only the chosen frames are converted to RGB, and memory holds the N
outputs plus two decoded frames, whatever the video's length.

Also: display-matrix rotation is applied (multiples of 90°; flips are ignored), frames whose longer side exceeds
`max_side` are scaled down by swscale while converting to RGB (before rotation), the sample aspect ratio is ignored.

The one timed decode path (DecodePool, used by describe, bench and dpo): videos are decoded and preprocessed in
background worker processes, so decoding overlaps the model, and a hung or crashing FFmpeg call costs one video, not
the run. A worker past `timeout` is killed and replaced (reason "decode_timeout"); one that dies is replaced
("decode_crash"); any other exception is "unexpected_error"; readable failures keep video.REASONS' reason.
"""

import bisect
import math
import os
import signal
import threading
import time
from fractions import Fraction
from multiprocessing import connection

import av
import numpy as np
import torch
import torch.nn.functional as F

# per family: (image_mean, image_std) of the hub preprocessor configs
NORMALIZE = {
    "llava_onevision": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "llava_next_video": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # CLIP
    "qwen2_5_vl": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # CLIP
    "qwen3_vl": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

REASONS = {
    "not_found": "no such file",
    "empty_file": "the file is empty",
    "open_error": "FFmpeg cannot open it as a media file",
    "no_video_stream": "it has no video stream",
    "decode_error": "decoding failed",
    "truncated": "the file ends before the duration its header declares",
    "no_frames": "no frame could be decoded",
}


class VideoError(Exception):
    """A video that cannot be read: `.path`, `.reason` (a key of REASONS) and `.cause` (the underlying error or a
    sentence). Callers record it per item and move on."""

    def __init__(self, path, reason, cause):
        assert reason in REASONS, reason
        self.path, self.reason, self.cause = str(path), reason, cause
        super().__init__(f"cannot read video {self.path}: {REASONS[reason]} ({cause})")


def _open(path):
    """Open `path` and return (container, its first real video stream), or raise VideoError."""
    if not os.path.exists(path):
        raise VideoError(path, "not_found", "check the path and the video root")
    if not os.path.isfile(path):
        raise VideoError(path, "not_found", "it is not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "empty_file", "0 bytes; the download or copy probably failed")
    try:
        container = av.open(path, metadata_errors="replace")  # a damaged tag must not fail the read
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(path, "open_error", e) from e
    # cover art in audio files is a one-picture "video" stream flagged attached_pic: not a video
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = [s.type for s in container.streams] or ["none"]
        container.close()
        raise VideoError(path, "no_video_stream", f"streams found: {', '.join(kinds)}")
    if streams[0].codec_context is None:
        container.close()
        raise VideoError(path, "decode_error", "FFmpeg has no decoder for its video codec")
    return container, streams[0]


def _duration(container, stream):
    """Stream duration in stream.time_base units. The stream header's when written (mp4, ts); otherwise (Matroska/WebM)
    measured: seek to the last keyframe and demux, without decoding, to the end. The container's duration only aims
    that seek, because formats disagree on whether it counts the start offset (mkv: a clip at 5-7 s says 7 s)."""
    if stream.duration:
        return stream.duration
    start = stream.start_time or 0
    guess = start + int(Fraction(container.duration or 0, av.time_base) / stream.time_base)
    end = start
    for aim in (guess, start):  # the tail after the last keyframe, else (seek refused, nothing there) everything
        try:
            container.seek(aim, backward=True, stream=stream)
        except av.error.FFmpegError:
            continue
        end = max((p.pts + (p.duration or 0) for p in container.demux(stream) if p.pts is not None), default=start)
        if end > start:
            break
    container.seek(start, backward=True, stream=stream)  # rewind for decoding
    return end - start


def _rgb(frame, size, sws):
    """Decoded frame -> uint8 (H, W, 3), scaled by swscale to `size` = (W, H) when it differs. `sws`: one
    VideoReformatter per read, one thread: frame.to_ndarray builds a fresh swscale context with its own thread pool
    for every frame (1.46 ms vs 0.08 ms per 640x360 frame on 2 loaded cores; the pixels are identical)."""
    if size == (frame.width, frame.height):
        return sws.reformat(frame, format="rgb24", threads=1).to_ndarray()
    return sws.reformat(frame, size[0], size[1], "rgb24", interpolation="AREA", threads=1).to_ndarray()


def read_frames(path, num_frames, max_side=1024, seek_gap=2.0, pick=None):
    """Read `num_frames` frames uniformly in time (policy in the module docstring), or at the times `pick(duration)`
    returns (seconds from the stream start, one per output frame, any order; each takes the frame on screen then, as
    the uniform targets do): the temporal probes' frame choice (`variant_times`). `max_side`: frames whose longer
    side exceeds it are scaled down while decoding (a 4K RGB frame is 25 MB and the models resize to 384/336 anyway);
    None keeps full resolution, which is what bit-parity with an HF pipeline fed full frames needs. `seek_gap`
    (seconds): without a seek index, seek only when the next target is further ahead than this.

    Returns frames uint8 (num_frames, H, W, 3) in display orientation, and info: timestamps (s, per output frame),
    targets (s), duration (s), start_time (s), unique_frames, original_size (H, W displayed, before scaling), size
    (H, W returned), rotation (degrees counter-clockwise applied), fps, decoded_frames, seeks, codec.
    Raises VideoError for anything unreadable and ValueError for bad arguments."""
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    path = os.fspath(path)
    container, stream = _open(path)
    try:
        with container:
            return _read(container, stream, path, num_frames, max_side, seek_gap, pick)
    except (av.error.FFmpegError, OSError, ValueError) as e:  # FFmpeg's errors, and PyAV's on damaged data
        raise VideoError(path, "decode_error", e) from e


def _read(container, stream, path, num_frames, max_side, seek_gap, pick=None):
    tb = stream.time_base                              # seconds per timestamp unit (Fraction)
    # slice threads only: frame threads hold frames in flight, so each seek drains and refills their pipeline for a
    # walk of half a GOP on average (32 of a 5-min clip: 0.47 s vs 0.36 s on 2 loaded cores, BENCHMARKS.md)
    stream.codec_context.thread_type = "SLICE"
    start = stream.start_time or 0
    duration = max(_duration(container, stream), 0)
    # segment midpoints, in stream timestamp units: start + (2i+1)·D/(2N)
    targets = [start + (2 * i + 1) * duration // (2 * num_frames) for i in range(num_frames)]
    if pick is not None:  # chosen times (s), clamped into the clip; visited sorted, returned in the order asked
        seconds = pick(float(duration * tb))
        assert len(seconds) == num_frames, (len(seconds), num_frames)
        targets = [start + min(max(round(Fraction(t) / tb), 0), max(duration - 1, 0)) for t in seconds]  # nearest tick
    order = sorted(range(num_frames), key=targets.__getitem__)
    keyframes = sorted(e.timestamp for e in stream.index_entries if e.is_keyframe)  # empty without an index
    gap = int(seek_gap / tb)
    frames = container.decode(stream)                  # generator: demux + decode from the current position
    last, ahead = None, None  # last: newest frame with pts <= current target; ahead: first decoded frame beyond it
    decoded, seeks, eof = 0, 0, False
    chosen, arrays, size, rotation, sws = [], {}, None, 0, av.video.reformatter.VideoReformatter()

    def pts(frame):
        if frame.pts is None:
            raise VideoError(path, "decode_error", "decoded frames carry no timestamps, so time cannot be sampled")
        return frame.pts

    for t in (targets[k] for k in order):
        position = pts(ahead) if ahead is not None else pts(last) if last is not None else start
        if ahead is None or pts(ahead) <= t:
            # seek only when the keyframe at or before t lies beyond what we have decoded (no index: t is far)
            if keyframes:
                k = bisect.bisect_right(keyframes, t)
                far = k > 0 and keyframes[k - 1] > position
            else:
                far = t - position > gap
            if far:
                try:
                    frames, first, n = _seek(container, stream, t, start, tb)
                    decoded, seeks, eof, ahead = decoded + n, seeks + 1, first is None, first
                except av.error.FFmpegError:  # an unseekable input: decode forward from here on (frames are
                    keyframes, gap = [], float("inf")  # picked by pts, so wherever the demuxer now stands is fine)
            while not eof and (ahead is None or pts(ahead) <= t):
                if ahead is not None:
                    last = ahead
                try:
                    ahead = next(frames, None)
                except av.error.InvalidDataError:  # damaged data after good frames (a cut file: slice-threaded
                    if last is None:               # decoding reports it here): the decodable part ends, and the
                        raise                      # targets left beyond it make the file "truncated" below
                    ahead = None
                if ahead is None:
                    eof = True
                else:
                    decoded += 1
        frame = last if last is not None and pts(last) <= t else ahead  # before the first frame: the first frame
        if frame is None:
            raise VideoError(path, "no_frames", f"the stream has no decodable frame ({stream.codec_context.name})")
        if eof and frame is last:
            # the decoder ran dry before t: fine within a frame or so, a truncated file beyond that
            slack = max(1.0, 0.05 * float(duration * tb)) + float((frame.duration or 0) * tb)
            if float((t - pts(frame)) * tb) > slack:
                raise VideoError(path, "truncated", f"frames end at {float((pts(frame) - start) * tb):.2f} s, "
                                                    f"the header says {float(duration * tb):.2f} s")
        if size is None:  # fixed by the first chosen frame, so every output has one shape
            scale = min(1.0, max_side / max(frame.width, frame.height)) if max_side else 1.0
            size = (max(1, round(frame.width * scale)), max(1, round(frame.height * scale)))
            rotation = (round((frame.rotation or 0) / 90) % 4) * 90
            original = (frame.height, frame.width) if rotation % 180 == 0 else (frame.width, frame.height)
        if pts(frame) not in arrays:
            arrays[pts(frame)] = np.rot90(_rgb(frame, size, sws), k=rotation // 90)  # counter-clockwise, as displayed
        chosen.append(pts(frame))

    chosen = [p for _, p in sorted(zip(order, chosen))]  # back to the order of `targets`
    out = np.ascontiguousarray(np.stack([arrays[p] for p in chosen]))
    info = {
        "timestamps": [float(p * tb) for p in chosen],
        "targets": [float(t * tb) for t in targets],
        "duration": float(duration * tb),
        "start_time": float(start * tb),
        "unique_frames": len(arrays),
        "original_size": original,
        "size": tuple(out.shape[1:3]),
        "rotation": rotation,
        "fps": float(stream.average_rate) if stream.average_rate else None,
        "decoded_frames": decoded,
        "seeks": seeks,
        "codec": stream.codec_context.name,
    }
    return out, info


def _seek(container, stream, t, start, tb):
    """Seek to the keyframe at or before t and return (frame generator, first frame or None, frames decoded). Some
    demuxers land after t (index by dts, B-frames); step back 1, 2, 4, ... s until the first frame is <= t."""
    back = 0
    while True:
        container.seek(max(t - back, start), backward=True, stream=stream)
        frames = container.decode(stream)
        first = next(frames, None)
        if first is None or first.pts is None or first.pts <= t or t - back <= start:
            return frames, first, int(first is not None)
        back = max(2 * back, int(1 / tb))


# -----------------------------------------------------------------------------
# preprocessing per family

def preprocess(frames, family, image_size):
    """uint8 frames (F, H, W, 3) (numpy or CPU torch) -> float32 pixel_values (F, 3, S, S), as the family's HF video
    processor computes them on CPU:
    - llava_onevision: resize to exactly S×S (aspect not kept);
    - llava_next_video: resize the shortest edge to S (long edge int(S·long/short)), centre-crop S×S;
    - qwen2_5_vl (the fixed-size path the scripts use): resize to exactly S×S, S a multiple of 28; the processor's
      own sizes and frame choice are `decode_video_qwen`; qwen3_vl the same with S a multiple of 32;
    resizing is antialiased bicubic on the uint8 tensor itself (interpolate's uint8 path rounds between its two
    passes; resizing in float and rounding afterwards differs by up to ±21 levels), skipped when already at size;
    then (x - 255·mean) / (255·std) in float32, the processor's fused rescale + normalize."""
    if family not in NORMALIZE:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(NORMALIZE)}")
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2)                          # (F, 3, H, W) uint8
    h, w = x.shape[-2:]
    S = image_size
    if family in ("llava_onevision", "qwen2_5_vl", "qwen3_vl"):
        size = (S, S)
    else:
        short, long = min(h, w), max(h, w)
        long = int(S * long / short)
        size = (S, long) if h <= w else (long, S)
    if (h, w) != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    if family == "llava_next_video":
        top, left = int((size[0] - S) / 2), int((size[1] - S) / 2)
        x = x[:, :, top:top + S, left:left + S]
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) * 255.0 for v in NORMALIZE[family])
    return ((x.float() - mean) / std).contiguous()     # (F, 3, S, S) float32


# -----------------------------------------------------------------------------
# Qwen2.5-VL as its processor (Qwen2VLVideoProcessor with do_sample_frames) prepares a video: `fps` frames per second
# within [min_frames, max_frames] and a multiple of the temporal patch (2), each frame resized to the multiples of 28
# nearest its size within [min_pixels, max_pixels] (`smart_resize`), CLIP mean/std. model.patchify then groups the
# frames into the processor's flattened patches + video_grid_thw.

QWEN_FPS, QWEN_MIN_FRAMES, QWEN_MAX_FRAMES = 2.0, 4, 768
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28  # the video processor's size defaults


def smart_resize(height, width, factor=28, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS):
    """(H, W) -> (H', W'): multiples of `factor`, each side rounded (Python's round) to the nearest; if the area
    leaves [min_pixels, max_pixels], both sides scaled by one factor onto it (floored when shrinking, ceiled when
    growing), keeping the aspect ratio as closely as the grid allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame {height}x{width}: aspect ratio above 200 (the processor's limit)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def qwen_frame_indices(total_frames, video_fps, fps=QWEN_FPS, min_frames=QWEN_MIN_FRAMES, max_frames=QWEN_MAX_FRAMES,
                       temporal_patch=2):
    """Indices of the decoded frames the processor keeps: duration x fps frames, clamped to [min_frames,
    max_frames] and to the video, floored to a multiple of the temporal patch, spaced evenly from frame 0 (the
    float32 arange the processor uses, truncated)."""
    top = math.floor(min(max_frames, total_frames) / temporal_patch) * temporal_patch
    n = min(max(total_frames / video_fps * fps, min_frames), top, total_frames)
    n = math.floor(n / temporal_patch) * temporal_patch
    if n < temporal_patch:
        raise ValueError(f"a video of {total_frames} frames is shorter than one temporal patch ({temporal_patch})")
    return torch.arange(0, total_frames, total_frames / n).int().tolist()


def read_all_frames(path, keep=None):
    """Decode every frame in order; return the frames whose ordinal is in `keep` (all when None) as uint8
    (n, H, W, 3) and the stream's (frame count, average fps). Memory holds the kept frames only."""
    path = os.fspath(path)
    container, stream = _open(path)
    try:
        with container:
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            container.seek(stream.start_time or 0, backward=True, stream=stream)
            wanted = set(range(total) if keep is None else keep(total, fps))
            frames = [(i, f.to_ndarray(format="rgb24")) for i, f in enumerate(container.decode(stream)) if i in wanted]
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise VideoError(path, "decode_error", e) from e
    if not frames:
        raise VideoError(path, "no_frames", "no frame could be decoded")
    return np.stack([f for _, f in frames]), dict(total_frames=total, fps=fps, indices=[i for i, _ in frames])


def decode_video_qwen(path, fps=QWEN_FPS, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS,
                      min_frames=QWEN_MIN_FRAMES, max_frames=QWEN_MAX_FRAMES):
    """One video -> (float32 numpy (F, 3, H', W'), info with `indices`, `second_per_grid_ts` (2 / the sampled
    fps, as Qwen2_5_VLProcessor computes it) and `unique_frames`), the processor's preprocessing on CPU."""
    frames, info = read_all_frames(path, keep=lambda total, video_fps: qwen_frame_indices(
        total, video_fps, fps, min_frames, max_frames))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8
    size = smart_resize(*x.shape[-2:], min_pixels=min_pixels, max_pixels=max_pixels)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) * 255.0 for v in NORMALIZE["qwen2_5_vl"])
    sampled_fps = len(info["indices"]) / info["total_frames"] * info["fps"]
    info.update(second_per_grid_ts=2 / sampled_fps, unique_frames=len(info["indices"]))
    return ((x.float() - mean) / std).numpy(), info


# -----------------------------------------------------------------------------
# the timed decode path: worker processes, a per-video timeout, crash isolation


def decode_video(path, num_frames, family, image_size, max_side=1024):
    """One video -> (pixel_values float32 numpy (num_frames, 3, S, S), unique_frames). Runs in a worker process."""
    frames, info = read_frames(path, num_frames, max_side=max_side)
    return preprocess(frames, family, image_size).numpy(), info["unique_frames"]


# -----------------------------------------------------------------------------
# temporal-risk probes (bench.py --temporal): the same clip with its risky span `[start, end)` (seconds from the
# stream start) late or sparse in the frames the model sees


def parse_variant(name):
    """"late" -> ("late", None); "sparse16" -> ("sparse", 16); anything else is an error naming the forms."""
    if name == "late":
        return "late", None
    if name.startswith("sparse") and name[6:].isdigit() and int(name[6:]) >= 1:
        return "sparse", int(name[6:])
    raise ValueError(f"temporal variant {name!r}: use late or sparseN (N frames over the whole clip), e.g. sparse8")


def midpoints(a, b, n):
    """n times splitting [a, b) into equal segments, each its segment's midpoint (read_frames' uniform policy)."""
    return [a + (i + 0.5) * (b - a) / n for i in range(n)]


def variant_times(variant, duration, span, num_frames):
    """The times (s from the start, in the order the model sees them) a variant samples. sparseN: N uniform over the
    clip. late: the risky span fills only the last 10% of `num_frames` (at least one frame, midpoints of the span);
    the other 90% are uniform over the clip before the span, or after it when the span opens the clip (then the
    order is after-then-span: the clip cut and the span moved to the end); a span that covers the whole clip leaves
    nothing outside it, so every frame is inside."""
    kind, n = parse_variant(variant)
    if kind == "sparse":
        return midpoints(0.0, duration, n)
    start, end = max(0.0, float(span[0])), min(duration, float(span[1]))
    if not end > start:
        raise ValueError(f"risk_span {list(span)} lies outside the clip (0 to {duration:.3f} s)")
    n_in = max(1, round(0.1 * num_frames))
    outside = (0.0, start) if start > 0 else (end, duration) if end < duration else None
    if outside is None:
        return midpoints(start, end, num_frames)
    return midpoints(*outside, num_frames - n_in) + midpoints(start, end, n_in)


def decode_variant(path, variant, span, num_frames, family, image_size, max_side=1024):
    """One video as a temporal variant sees it -> (pixel_values float32 numpy (F, 3, S, S), frames info: variant,
    timestamps (s from the start, per frame), inside (frames whose timestamp lies in the span [start, end)),
    num_frames, in_span_fraction). F = num_frames for late, N for sparseN. Runs in a decode worker."""
    kind, n = parse_variant(variant)
    n = num_frames if kind == "late" else n
    frames, info = read_frames(path, n, max_side=max_side,
                               pick=lambda duration: variant_times(variant, duration, span, num_frames))
    times = [t - info["start_time"] for t in info["timestamps"]]
    inside = sum(span[0] <= t < span[1] for t in times)
    return preprocess(frames, family, image_size).numpy(), dict(
        variant=variant, timestamps=[round(t, 4) for t in times], inside=inside, num_frames=n,
        in_span_fraction=inside / n)


def _decode_one(decode_fn, path, decode_args):
    """("ok", result) or ("error", reason, message): what a worker sends back for one video."""
    try:
        return ("ok", decode_fn(path, *decode_args))
    except VideoError as e:
        return ("error", e.reason, str(e))
    except Exception as e:  # PyAV can raise anything on a hostile file: one video's problem, not the run's
        return ("error", "unexpected_error", f"{type(e).__name__}: {e}")


def item_args(item):
    """An item's own decode arguments (its "decode_args", e.g. a temporal variant and span), passed to decode_fn
    before the stream's shared ones."""
    return tuple(item.get("decode_args", ()))


def _worker(conn, decode_fn, decode_args):
    """Worker process: decode each path received on `conn`, send the result back; exit on None or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle; it kills us
    try:  # die with our parent (the forkserver, which exits with the main process), even while hung in FFmpeg
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    torch.set_num_threads(1)  # several workers beside the model: do not oversubscribe the cores
    while True:
        try:
            got = conn.recv()
        except (EOFError, OSError):
            return
        if got is None:
            return
        path, item_args = got
        # a pipe per worker, written synchronously: a worker killed mid-send corrupts only its own pipe
        try:
            conn.send(_decode_one(decode_fn, path, item_args + decode_args))
        except OSError:  # the main process is gone
            return


class decode_inline:
    """The baseline, no timeout possible: decode in this process, one video after another, in order. Iterates
    (item, message) like DecodePool; close() is a no-op."""

    def __init__(self, items, decode_fn, decode_args):
        self.items, self.decode_fn, self.decode_args = items, decode_fn, tuple(decode_args)

    def __iter__(self):
        for item in self.items:
            yield item, _decode_one(self.decode_fn, item["path"], item_args(item) + self.decode_args)

    def close(self):
        pass


class DecodePool:
    """Decode `items` (dicts with a "path", optionally their own "decode_args": see item_args) in `workers` background
    processes, fed by a thread of this process, so decoding goes on while the caller computes (work starts at
    construction). Iterate for (item, message), message
    ("ok", decode_fn's result) or ("error", reason, text): in completion order, or in the items' order with
    `ordered=True`. At most `capacity` videos are in flight or waiting to be consumed (memory bound). A worker busy
    past `timeout` seconds is killed and replaced ("decode_timeout"); one that dies is replaced too ("decode_crash").
    close() stops everything."""

    def __init__(self, items, decode_fn, decode_args, workers=2, timeout=120.0, capacity=8, ordered=False):
        import multiprocessing
        import queue
        # forkserver: workers fork from a clean single-threaded server, not from this process (threads, CUDA, torch
        # thread pools), and each starts in milliseconds once the server has imported torch and PyAV
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__])
        self.items, self.decode_fn, self.decode_args = items, decode_fn, tuple(decode_args)
        self.workers, self.timeout, self.capacity, self.ordered = workers, timeout, max(capacity, workers), ordered
        self.results, self.stop = queue.Queue(), threading.Event()
        self.pending, self.next_out = {}, 0  # ordered: results waiting for an earlier item
        self.thread = threading.Thread(target=self._manage, name="decode-manager", daemon=True)
        self.thread.start()

    def __iter__(self):
        while True:
            got = self.results.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def close(self):
        self.stop.set()
        self.thread.join()

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.decode_fn, self.decode_args), daemon=True)
        proc.start()
        child.close()  # so a dead worker reads as EOF on our end
        return {"proc": proc, "conn": parent, "item": None, "k": None, "since": 0.0}

    def _emit(self, w, message):
        """Hand worker w's result to the consumer (in order if asked) and mark the worker idle."""
        if not self.ordered:
            self.results.put((w["item"], message))
        else:
            self.pending[w["k"]] = (w["item"], message)
            while self.next_out in self.pending:
                self.results.put(self.pending.pop(self.next_out))
                self.next_out += 1
        w["item"] = None

    def _retire(self, w, reason, text):
        """Kill worker `w`, record its video as failed with `reason`, return a fresh worker."""
        w["proc"].kill()
        w["proc"].join()
        w["conn"].close()
        self._emit(w, ("error", reason, text))
        return self._start()

    def _manage(self):
        pool, results, timeout = [], self.results, self.timeout
        try:
            pool = [self._start() for _ in range(self.workers)]
            todo, exhausted, k = iter(self.items), False, 0
            while not self.stop.is_set():
                for w in pool:  # feed idle workers while the memory bound allows
                    busy = sum(x["item"] is not None for x in pool)
                    held = results.qsize() + busy + len(self.pending)
                    if w["item"] is None and not exhausted and held < self.capacity:
                        w["item"] = next(todo, None)
                        if w["item"] is None:
                            exhausted = True
                        else:
                            w["conn"].send((w["item"]["path"], item_args(w["item"])))
                            w["k"], w["since"], k = k, time.monotonic(), k + 1
                busy = [w for w in pool if w["item"] is not None]
                if exhausted and not busy:
                    break
                if not busy:
                    self.stop.wait(0.01)  # the consumer is behind: wait for it to take results
                    continue
                wait_s = min(w["since"] for w in busy) + timeout - time.monotonic()
                ready = set(connection.wait([w["conn"] for w in busy], timeout=min(max(wait_s, 0), 0.05)))
                for i, w in enumerate(pool):
                    if w["conn"] in ready:  # a result, or EOF from a worker that died
                        try:
                            message = w["conn"].recv()
                        except (EOFError, OSError):
                            w["proc"].join(5)
                            pool[i] = self._retire(w, "decode_crash", f"the decode worker died (exit code "
                                                                      f"{w['proc'].exitcode}) on this video")
                            continue
                        self._emit(w, message)
                    elif w["item"] is not None and time.monotonic() - w["since"] > timeout:
                        pool[i] = self._retire(w, "decode_timeout", f"decoding took longer than {timeout:g} s; "
                                               "worker killed (raise --decode_timeout if the video is fine)")
            results.put(None)
        except BaseException as e:  # surfaces in the consumer
            results.put(e)
        finally:
            for w in pool:
                w["proc"].kill()
                w["proc"].join()
                w["conn"].close()


def decode_stream(items, decode_args, workers=2, timeout=120.0, capacity=8, ordered=False, decode_fn=decode_video):
    """(item, message) for each item: a DecodePool with `workers` > 0, else decoding inline (no timeout)."""
    if workers > 0 and items:
        return DecodePool(items, decode_fn, decode_args, workers, timeout, capacity, ordered)
    return decode_inline(items, decode_fn, decode_args)
