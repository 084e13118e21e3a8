"""
Test videos written with PyAV, good and broken, for test_video.py and the scripts' tests (describe.py, ...).
Not a test module; import as `from tests.media import write_video, ...` (or `from media import ...` inside tests/).

Every frame of `write_video` carries its index as black/white vertical stripes (two rows of 8 bits),
which survives H.264 at the quality used here, so `frame_index(frame)` says which source frame a decoder returned.
Frames are small (48×64) and encoded with x264 ultrafast, so each file takes milliseconds.
"""

import struct
from fractions import Fraction

import av
import numpy as np

HEIGHT, WIDTH = 48, 64


def code_frame(index, height=HEIGHT, width=WIDTH):
    """uint8 (height, width, 3): index (0..65535) in black/white vertical stripes, 8 per half, white = 1; the top
    half holds the high byte, the bottom half the low byte, most significant bit on the left."""
    assert 0 <= index < 1 << 16 and width % 8 == 0 and height % 2 == 0
    a = np.empty((height, width, 3), np.uint8)
    for half, byte in enumerate((index >> 8, index & 255)):
        bits = np.array([(byte >> (7 - b)) & 1 for b in range(8)], np.uint8) * 255
        a[half * height // 2: (half + 1) * height // 2] = np.repeat(bits, width // 8)[None, :, None]
    return a


def frame_index(frame):
    """Inverse of code_frame for a decoded uint8 (H, W, 3) frame (any size, unrotated)."""
    h, w = frame.shape[:2]
    index = 0
    for row in (h // 4, 3 * h // 4):  # the middle row of each half, the centre column of each stripe
        for b in range(8):
            index = index << 1 | int(frame[row, (2 * b + 1) * w // 16].mean() > 127)
    return index


def corner_frame(index=0, height=HEIGHT, width=WIDTH):
    """uint8 (height, width, 3): black with a white top-left quadrant, to see orientation."""
    a = np.zeros((height, width, 3), np.uint8)
    a[: height // 2, : width // 2] = 255
    return a


def write_video(path, num_frames=None, fps=10, times=None, gop=None, rotation=None, faststart=False,
                frame_fn=code_frame, size=(HEIGHT, WIDTH), audio=False, codec="libx264", preset="ultrafast"):
    """Write a video (H.264 by default; the container follows the file extension) and return its path.
    Constant rate: `num_frames` at `fps`. Variable rate: `times`, each frame's presentation time in seconds (1 ms
    time base). `gop`: keyframe interval in frames. `frame_fn(index, height, width)` draws frame `index`.
    `rotation`: display-matrix rotation, degrees counter-clockwise (PyAV's convention). `faststart`: moov atom before
    the media data. `audio`: also a silent AAC track. `preset`: x264's; "medium" adds B-frames."""
    times = list(times) if times is not None else [i / fps for i in range(num_frames)]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"g": str(gop or 250)}
        if codec == "libx264":
            stream.options = {"preset": preset, "crf": "12", "g": str(gop or 250), "keyint_min": str(gop or 25)}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if audio:
            sound = container.add_stream("aac", rate=16000, layout="mono")
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(frame_fn(i, *size), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if audio:
            samples = max(1, int((times[-1] + 1 / fps) * 16000) // 1024)
            for k in range(samples):
                chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
                chunk.sample_rate, chunk.pts = 16000, k * 1024
                container.mux(sound.encode(chunk))
            container.mux(sound.encode())
    return path


def write_audio_only(path, seconds=0.5):
    """An mp4 with one AAC track and no video."""
    with av.open(str(path), "w", format="mp4") as container:
        sound = container.add_stream("aac", rate=16000, layout="mono")
        for k in range(int(seconds * 16000) // 1024):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, k * 1024
            container.mux(sound.encode(chunk))
        container.mux(sound.encode())
    return path


def write_text(path, text="this is not a video\n" * 20):
    with open(path, "w") as f:
        f.write(text)
    return path


def write_empty(path):
    open(path, "wb").close()
    return path


def truncate(path, keep=0.5):
    """Cut the file to `keep` of its bytes, as an interrupted download leaves it."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return path


def set_track_matrix(path, matrix):
    """Overwrite the first video track header's (tkhd) display matrix in place: 9 ints in QuickTime order
    (a, b, u, c, d, v, x, y, w), a-d/x/y as 16.16 fixed point, u/v/w as 2.30. A portrait phone video, meant to be
    shown turned 90° clockwise, stores a=0, b=1, c=-1, d=0 (ISO/IEC 14496-12 §8.3.2, QuickTime File Format)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.find(b"tkhd")
    assert at > 0, "no tkhd box"
    version = data[at + 4]
    # after 'tkhd': version+flags 4, times/track/reserved/duration 20 (v0) or 32 (v1), reserved 8, layer 2,
    # alternate group 2, volume 2, reserved 2; then the 36-byte matrix
    offset = at + 4 + 4 + (32 if version == 1 else 20) + 16
    data[offset: offset + 36] = struct.pack(">9i", *matrix)
    with open(path, "wb") as f:
        f.write(data)
    return path


PORTRAIT_CLOCKWISE = (0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)  # "rotate: 90" in ffprobe terms
