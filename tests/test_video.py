"""
video.py: read_frames on videos written by PyAV in the test (tests/media.py), and preprocess against PIL.

Which source frame came back is read from the pixels (each test frame carries its index as stripes), so frame choice
is checked independently of the timestamps read_frames reports. Run: .venv/bin/python -m pytest -q tests/test_video.py
"""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.media import (PORTRAIT_CLOCKWISE, corner_frame, frame_index, set_track_matrix, truncate, write_audio_only,
                         write_empty, write_text, write_video)
from video import NORMALIZE, VideoError, preprocess, read_frames


def displayed_at(times, t):
    """Index of the frame on screen at time t: the last one starting at or before t (the first if none)."""
    before = [i for i, s in enumerate(times) if s <= t + 1e-9]
    return before[-1] if before else 0


def test_cfr_count_and_midpoints(tmp_path):
    path = write_video(tmp_path / "cfr.mp4", 20, fps=10)
    frames, info = read_frames(path, 4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    # 2 s in 4 segments: midpoints 0.25, 0.75, 1.25, 1.75 s -> frames 2, 7, 12, 17 at 10 fps
    assert [frame_index(f) for f in frames] == [2, 7, 12, 17]
    assert info["targets"] == pytest.approx([0.25, 0.75, 1.25, 1.75])
    assert info["timestamps"] == pytest.approx([0.2, 0.7, 1.2, 1.7])
    assert info["duration"] == pytest.approx(2.0) and info["unique_frames"] == 4 and info["rotation"] == 0
    assert info["original_size"] == info["size"] == (48, 64)
    # as many targets as frames: every frame exactly once
    frames, info = read_frames(path, 20)
    assert [frame_index(f) for f in frames] == list(range(20)) and info["unique_frames"] == 20


@pytest.mark.parametrize("name,preset", [("vfr.mp4", "ultrafast"), ("vfr_bframes.mkv", "medium")])
def test_vfr_uniform_in_time(tmp_path, name, preset):
    # 50 frames 20 ms apart, then 8 frames 250 ms apart: uniform in index would pick mostly the dense first second
    times = [i * 0.02 for i in range(50)] + [1.0 + i * 0.25 for i in range(8)]
    path = write_video(tmp_path / name, times=times, gop=10, preset=preset)
    frames, info = read_frames(path, 6)
    duration = info["duration"]
    assert times[-1] < duration <= times[-1] + 0.3
    assert info["targets"] == pytest.approx([(i + 0.5) * duration / 6 for i in range(6)], abs=1e-3)
    want = [displayed_at(times, t) for t in info["targets"]]
    assert [frame_index(f) for f in frames] == want
    assert info["timestamps"] == pytest.approx([times[i] for i in want], abs=1e-3)
    assert sum(times[i] >= 1.0 for i in want) >= 4  # most picks fall in the sparse part, as time dictates


def test_rotation_applied(tmp_path):
    stored = corner_frame()  # (48, 64): white top-left quadrant
    # PyAV's display rotation is counter-clockwise (FFmpeg's av_display_rotation_get convention)
    path = write_video(tmp_path / "ccw.mp4", 2, frame_fn=corner_frame, rotation=90)
    frames, info = read_frames(path, 1)
    assert info["rotation"] == 90 and frames.shape == (1, 64, 48, 3) and info["original_size"] == (64, 48)
    assert ((frames[0] > 127) == (np.rot90(stored, 1) > 127)).all()
    # a portrait phone clip: the QuickTime track matrix written by hand says "turn 90 degrees clockwise"
    path = set_track_matrix(write_video(tmp_path / "phone.mp4", 2, frame_fn=corner_frame), PORTRAIT_CLOCKWISE)
    frames, info = read_frames(path, 1)
    assert info["rotation"] == 270 and frames.shape == (1, 64, 48, 3)
    assert ((frames[0] > 127) == (np.rot90(stored, -1) > 127)).all()  # white quadrant now top-right


def test_one_frame_clip_repeats(tmp_path):
    frames, info = read_frames(write_video(tmp_path / "one.mp4", 1), 5)
    assert frames.shape == (5, 48, 64, 3) and info["unique_frames"] == 1
    assert all((f == frames[0]).all() for f in frames) and frame_index(frames[0]) == 0


@pytest.mark.parametrize("num_frames,preset", [(5, "ultrafast"), (4, "medium")])
def test_long_clip_seeks_instead_of_decoding_all(tmp_path, num_frames, preset):
    fps, n, gop = 30, 300, 15  # 10 s, a keyframe every 0.5 s
    path = write_video(tmp_path / f"long_{preset}.mp4", n, fps=fps, gop=gop, preset=preset)
    frames, info = read_frames(path, num_frames)
    targets = [(2 * i + 1) * Fraction(n, fps) / (2 * num_frames) for i in range(num_frames)]
    assert [frame_index(f) for f in frames] == [int(t * fps) for t in targets]  # CFR: frame floor(t·fps)
    assert info["seeks"] >= num_frames - 1
    assert info["decoded_frames"] <= num_frames * (gop + 8)  # about one GOP per target (+ B-frame reorder delay)


@pytest.mark.parametrize("preset", ["ultrafast", "medium"])
def test_pixels_match_plain_pyav_decode(tmp_path, preset):
    # pixel-exact against PyAV's own path (decode every frame, frame.to_ndarray), full size and scaled: read_frames
    # seeks, decodes with slice threads and converts through one reused swscale context; "medium" has B-frames
    fps, size = 30, (96, 128)
    noisy = lambda i, h, w: np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)  # nothing flat
    path = write_video(tmp_path / f"px_{preset}.mp4", 90, fps=fps, gop=10, preset=preset, frame_fn=noisy, size=size)
    with av.open(str(path)) as container:
        decoded = list(container.decode(video=0))
    for max_side, (w, h) in [(None, (128, 96)), (64, (64, 48))]:
        frames, info = read_frames(path, 7, max_side=max_side)
        want = [int(t * fps) for t in info["targets"]]  # CFR: frame floor(t·fps)
        ref = [decoded[i].to_ndarray(format="rgb24", width=w, height=h, interpolation=None if max_side is None
                                     else "AREA") for i in want]
        assert np.array_equal(frames, np.stack(ref)), f"preset={preset} max_side={max_side}"
    assert info["seeks"] >= 5


def test_unseekable_input_decodes_forward(tmp_path, monkeypatch):
    path = write_video(tmp_path / "long.mp4", 120, fps=30, gop=15)

    def refuse(*args, **kwargs):
        raise av.error.PermissionError(1, "seek refused")

    monkeypatch.setattr(av.container.InputContainer, "seek", refuse)
    frames, info = read_frames(path, 4)
    assert [frame_index(f) for f in frames] == [15, 45, 75, 105] and info["seeks"] == 0
    assert info["decoded_frames"] >= 105


def test_no_index_container_and_audio_track(tmp_path):
    # Matroska written without cues: no seek index, so read_frames decodes forward while targets are close
    path = write_video(tmp_path / "clip.mkv", 60, gop=12)
    frames, _ = read_frames(path, 5)
    assert [frame_index(f) for f in frames] == [6, 18, 30, 42, 54]
    frames, _ = read_frames(write_video(tmp_path / "av.mp4", 20, audio=True), 4)
    assert [frame_index(f) for f in frames] == [2, 7, 12, 17]


@pytest.mark.parametrize("name", ["late.mp4", "late.mkv"])
def test_nonzero_start_time(tmp_path, name):
    # a clip whose first frame is at 5 s; Matroska writes no stream duration and a container duration that counts
    # the 5 s offset, so the reader must measure the stream's end itself
    path = write_video(tmp_path / name, times=[5.0 + i * 0.1 for i in range(20)])
    frames, info = read_frames(path, 4)
    assert info["start_time"] == pytest.approx(5.0) and info["duration"] == pytest.approx(2.0, abs=0.05)
    assert [frame_index(f) for f in frames] == [2, 7, 12, 17]


def test_damaged_files_raise_only_video_error(tmp_path):
    """Random byte damage anywhere (headers, tags, media data): frames of the right shape, or a VideoError."""
    clean = write_video(tmp_path / "clean.mp4", 30, gop=10, preset="medium").read_bytes()
    rng = np.random.default_rng(0)
    reasons = set()
    for trial in range(60):
        damaged = bytearray(clean)
        for at in rng.integers(0, len(clean), rng.choice([1, 10, 100])):
            damaged[at] = rng.integers(0, 256)
        path = tmp_path / "damaged.mp4"
        path.write_bytes(bytes(damaged))
        try:
            frames, _ = read_frames(path, 3)
            assert frames.shape[0] == 3 and frames.dtype == np.uint8
            reasons.add("ok")
        except VideoError as e:
            reasons.add(e.reason)
    assert "ok" in reasons and len(reasons) >= 3  # the damage did hit several different code paths


def test_max_side_scales_at_decode(tmp_path):
    path = write_video(tmp_path / "big.mp4", 3, size=(480, 640))
    frames, info = read_frames(path, 3, max_side=100)
    assert frames.shape == (3, 75, 100, 3) and info["original_size"] == (480, 640) and info["size"] == (75, 100)
    assert [frame_index(f) for f in frames] == [0, 1, 2]
    assert read_frames(path, 1, max_side=None)[0].shape == (1, 480, 640, 3)


def test_unreadable_inputs(tmp_path):
    cases = {
        "not_found": tmp_path / "missing.mp4",
        "empty_file": write_empty(tmp_path / "empty.mp4"),
        "open_error": write_text(tmp_path / "notes.mp4"),
        "no_video_stream": write_audio_only(tmp_path / "audio.mp4"),
    }
    # an interrupted download: moov atom at the end is lost (cannot open) / at the front, media data cut short
    cases["open_error "] = truncate(write_video(tmp_path / "cut.mp4", 100, gop=10))
    cases["truncated"] = truncate(write_video(tmp_path / "cut_fast.mp4", 100, gop=10, faststart=True))
    for reason, path in cases.items():
        with pytest.raises(VideoError) as e:
            read_frames(path, 4)
        assert e.value.reason == reason.strip() and e.value.path == str(path)
        assert str(path) in str(e.value) and e.value.cause is not None
    with pytest.raises(ValueError, match="num_frames"):
        read_frames(tmp_path / "missing.mp4", 0)


# -----------------------------------------------------------------------------
# preprocess
# Oracle: PIL's bicubic resize (Keys a=-0.5, support widened by the scale = antialias, fixed point with uint8 rounding
# between the horizontal and vertical pass), the resampler torch's uint8 antialiased bicubic was written to match.
# They quantize the filter weights differently, so each pass may round one level apart: tolerance 2 grey levels max
# (and a tiny mean). Resizing in float and rounding once, the common mistake, is off by ~20 levels on these frames.

def pil_resize(frames, height, width):
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])


def normalize_oracle(u8, family):
    """(x - 255·mean) / (255·std) in float32, as the HF processor fuses rescale and normalize; u8 (F, H, W, 3)."""
    mean, std = (np.float32(255) * np.array(v, np.float32) for v in NORMALIZE[family])
    return torch.from_numpy(((u8.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2).copy())


def noisy_frames(shape, seed=0):
    rng = np.random.default_rng(seed)
    f, h, w = shape
    smooth = np.linspace(0, 255, w)[None, None, :, None] * np.ones((f, h, 1, 3))
    return np.clip(smooth + rng.normal(0, 60, (f, h, w, 3)), 0, 255).astype(np.uint8)


def assert_levels_close(got, want, family):
    """got/want float32 (F, 3, S, S) normalized; compare in grey levels."""
    std = 255 * torch.tensor(NORMALIZE[family][1]).view(3, 1, 1)
    diff = ((got - want) * std).abs()
    assert diff.max() <= 2 + 1e-3, f"max |Δ| {diff.max():.2f} grey levels"
    assert diff.mean() <= 0.05, f"mean |Δ| {diff.mean():.4f} grey levels"


@pytest.mark.parametrize("shape", [(3, 40, 52), (2, 20, 14), (2, 60, 80)])
def test_preprocess_onevision_matches_pil(shape):
    frames, S = noisy_frames(shape), 35
    got = preprocess(frames, "llava_onevision", S)
    assert got.shape == (shape[0], 3, S, S) and got.dtype == torch.float32
    want = normalize_oracle(pil_resize(frames, S, S), "llava_onevision")
    assert_levels_close(got, want, "llava_onevision")
    # the tolerance can fail: resizing in float and rounding once is far off
    wrong = torch.nn.functional.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(S, S),
                                            mode="bicubic", antialias=True).round().clamp(0, 255)
    assert ((wrong - 127.5) / 127.5 - want).abs().max() * 127.5 > 2


@pytest.mark.parametrize("hw", [(24, 32), (9, 14), (14, 9), (40, 40)])
def test_preprocess_next_video_matches_pil(hw):
    frames, S = noisy_frames((2, *hw), seed=1), 16
    h, w = hw
    # shortest edge -> S, long edge truncated (9x14 -> 16x24, where rounding would give 25), then centre crop
    rh, rw = (S, int(S * w / h)) if h <= w else (int(S * h / w), S)
    top, left = int((rh - S) / 2), int((rw - S) / 2)
    want = normalize_oracle(pil_resize(frames, rh, rw)[:, top:top + S, left:left + S], "llava_next_video")
    got = preprocess(frames, "llava_next_video", S)
    assert got.shape == (2, 3, S, S)
    assert_levels_close(got, want, "llava_next_video")


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_preprocess_exact_normalization_without_resize(family):
    frames = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    got = preprocess(torch.from_numpy(frames), family, 16)  # already S x S: no resize, exact arithmetic
    assert torch.equal(got, normalize_oracle(frames, family))
    if family == "llava_onevision":
        exact = (frames.astype(np.float64) - 127.5) / 127.5  # fp64 then rounded once: equal to fp32 (x-127.5)/127.5
        assert torch.equal(got, torch.from_numpy(exact).permute(0, 3, 1, 2).float())
    with pytest.raises(ValueError, match="uint8"):
        preprocess(frames.astype(np.float32), family, 16)
    with pytest.raises(ValueError, match="family"):
        preprocess(frames, "llava", 16)
