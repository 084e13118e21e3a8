"""
describe.py: input discovery, good and broken videos, resume, timeouts, torchrun sharding, and parity with a direct
model.generate call. Videos are written by PyAV here (tests/media.py), the model is tests/tiny.py's random
llava_onevision checkpoint.

    .venv/bin/python -m pytest -q tests/test_describe.py

Checks:
- find_videos: a directory (recursive, by extension), a text list and a JSONL give the same ids; bad input errors;
- a folder of good clips (plain, 1 frame, VFR, rotated) and broken files (zero bytes, truncated, text named .mp4,
  audio only): one record per good clip, one error with its reason per broken file; a rerun does nothing; with
  retry_errors the broken ones are tried again and the errors file still holds one line per id;
- descriptions equal tokenizer.decode(model.generate(...)) called directly on the same frames, with background
  workers and inline, batched and not;
- a decode that hangs is killed at decode_timeout (decode_timeout), a worker that dies is replaced (decode_crash),
  the run goes on;
- kill -9 mid-run, a torn line appended, rerun: every id exactly once, the same descriptions as one clean run;
- torchrun --nproc_per_node=2 (gloo): the same records as one process, each id once, no part files left.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import describe
import records
import video
from tests import media
from tests.tiny import make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = ["plain.mp4", "nested/deeper/clip.mkv", "one_frame.mp4", "vfr.mp4", "rotated.mov", "UPPER.MP4"]
BROKEN = {"zero.mp4": "empty_file", "truncated.mp4": "truncated", "text.mp4": "open_error",
          "audio_only.mp4": "no_video_stream"}
NUM_FRAMES = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def write_folder(root):
    """GOOD and BROKEN under `root`, plus a file with another extension that must be ignored."""
    os.makedirs(os.path.join(root, "nested", "deeper"), exist_ok=True)
    media.write_video(os.path.join(root, "plain.mp4"), num_frames=12)
    media.write_video(os.path.join(root, "nested/deeper/clip.mkv"), num_frames=8, fps=5)
    media.write_video(os.path.join(root, "one_frame.mp4"), num_frames=1)
    media.write_video(os.path.join(root, "vfr.mp4"), times=[0, 0.05, 0.1, 0.6, 0.65, 1.5, 1.52, 2.0])
    media.write_video(os.path.join(root, "rotated.mov"), num_frames=6, rotation=90)
    media.write_video(os.path.join(root, "UPPER.MP4"), num_frames=5)
    media.write_empty(os.path.join(root, "zero.mp4"))
    media.truncate(media.write_video(os.path.join(root, "truncated.mp4"), num_frames=40, faststart=True), 0.8)
    media.write_text(os.path.join(root, "text.mp4"))
    media.write_audio_only(os.path.join(root, "audio_only.mp4"))
    media.write_text(os.path.join(root, "notes.txt"))
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("videos"))


def config(ckpt, videos, out, **overrides):
    base = dict(model=ckpt, videos=str(videos), out=str(out), num_frames=NUM_FRAMES, max_new_tokens=12,
                batch_size=2, decode_workers=1, decode_timeout=60.0, progress=False)
    return {**describe.DEFAULTS, **base, **overrides}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def by_id(records):
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    return {r["id"]: r for r in records}


# ---------------------------------------------------------------------------------------------------------------


def test_find_videos(folder, tmp_path):
    items = describe.find_videos(folder)
    assert sorted(it["video"] for it in items) == sorted(GOOD + list(BROKEN))  # notes.txt ignored, .MP4 found
    assert [it["id"] for it in items] == sorted(records.video_id(it["video"]) for it in items)
    assert all(os.path.isfile(it["path"]) for it in items)
    # a text list (relative to video_root, a comment, a duplicate) and a JSONL name the same videos, same ids
    listing = tmp_path / "list.txt"
    listing.write_text("# my videos\n\n" + "\n".join(GOOD + ["./plain.mp4"]) + "\n")
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"video": v, "other": 1}) + "\n" for v in GOOD))
    want = {it["id"]: it for it in items if it["video"] in GOOD}
    for source in (listing, jsonl):
        assert {it["id"]: it for it in describe.find_videos(str(source), video_root=folder)} == want
    # absolute paths inside video_root get the same relative `video`, hence the same id
    absolute = tmp_path / "abs.txt"
    absolute.write_text(os.path.join(folder, "plain.mp4") + "\n")
    assert describe.find_videos(str(absolute), video_root=folder)[0]["id"] == records.video_id("plain.mp4")
    # bad inputs: one sentence naming the thing
    with pytest.raises(FileNotFoundError, match="not found"):
        describe.find_videos(str(tmp_path / "nope"))
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 has no `video`"):
        describe.find_videos(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no videos"):
        describe.find_videos(str(tmp_path / "empty"))


def test_good_and_broken_then_resume(ckpt, folder, tmp_path):
    out = tmp_path / "d.jsonl"
    summary = describe.run(config(ckpt, folder, out))
    recs, errors = by_id(read(out)), by_id(read(describe.errors_path(str(out))))
    assert sorted(r["video"] for r in recs.values()) == sorted(GOOD)
    assert {e["video"]: e["reason"] for e in errors.values()} == BROKEN
    for r in recs.values():
        assert r["id"] == records.video_id(r["video"]) and r["model"] == ckpt
        assert r["num_frames"] == NUM_FRAMES and isinstance(r["description"], str)
    unique = {r["video"]: r["unique_frames"] for r in recs.values()}
    assert unique["one_frame.mp4"] == 1 and unique["plain.mp4"] == NUM_FRAMES  # 1 frame: repeated, counted
    assert summary["done"] == len(GOOD) and summary["failed"] == len(BROKEN) and summary["skipped"] == 0
    assert summary["failed_by_reason"] == {r: 1 for r in BROKEN.values()}
    assert summary["status"] == "done"  # broken videos are recorded with their reason: done, not left for a rerun

    again = describe.run(config(ckpt, folder, out))  # nothing left to do
    assert again["done"] == 0 and again["failed"] == 0 and again["skipped"] == len(GOOD) + len(BROKEN)
    assert read(out) == list(recs.values())

    retry = describe.run(config(ckpt, folder, out, retry_errors=True))  # the broken ones again, still broken
    assert retry["done"] == 0 and retry["failed"] == len(BROKEN) and retry["skipped"] == len(GOOD)
    assert read(describe.errors_path(str(out))) == list(errors.values())  # one line per id, the first failure


def direct_descriptions(ckpt, paths, batch):
    """The oracle: frames -> preprocess -> chat prompt -> model.generate -> decode, written out by hand."""
    from model import VLM
    from tokenizer import Tokenizer, chat_prompt
    from video import preprocess, read_frames
    vlm, tok = VLM.from_pretrained(ckpt), Tokenizer.from_pretrained(ckpt)
    c = vlm.config
    with open(os.path.join(REPO, "data/prompts/describe.txt")) as f:  # by hand, not tok.video_prompt
        text = chat_prompt(c.family, [{"role": "user", "content": [{"type": "video"},
                                                                   {"type": "text", "text": f.read().strip()}]}])
    assert "<video>\nDescribe this video" in text
    ids = tok.encode_prompt(text, vlm.num_video_tokens(NUM_FRAMES))
    out = {}
    for k in range(0, len(paths), batch):
        chunk = paths[k:k + batch]
        pixels = torch.stack([preprocess(read_frames(p, NUM_FRAMES)[0], c.family, c.vision.image_size)
                              for p in chunk])
        new = vlm.generate([ids] * len(chunk), pixel_values_videos=pixels, max_new_tokens=12, stop_ids=tok.stop_ids)
        out.update({p: tok.decode(n, skip_special=True).strip() for p, n in zip(chunk, new)})
    return out


def test_matches_direct_generate(ckpt, folder, tmp_path):
    """Inline decoding keeps the sorted-id order, so batches are the same as the oracle's; with workers (completion
    order) compare at batch_size 1."""
    items = [it for it in describe.find_videos(folder) if it["video"] in GOOD]
    paths = [it["path"] for it in items]
    for batch, workers in ((2, 0), (1, 2)):
        listing = tmp_path / "list.txt"
        listing.write_text("\n".join(paths) + "\n")
        out = tmp_path / f"d{batch}{workers}.jsonl"
        describe.run(config(ckpt, str(listing), out, batch_size=batch, decode_workers=workers))
        got = {r["video"]: r["description"] for r in read(out)}
        assert got == direct_descriptions(ckpt, paths, batch)
        assert len(set(got.values())) > 1, "every video got the same text: the frames did not reach the model"


def test_llava_next_video(tmp_path, folder):
    """The other family: its chat format, BOS, CLIP normalisation and pooling, through the same path."""
    ckpt = make_tiny_checkpoint(tmp_path / "nv", family="llava_next_video")
    paths = [it["path"] for it in describe.find_videos(folder) if it["video"] in GOOD]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    describe.run(config(ckpt, str(listing), tmp_path / "d.jsonl", batch_size=3, decode_workers=0))
    got = {r["video"]: r["description"] for r in read(tmp_path / "d.jsonl")}
    assert got == direct_descriptions(ckpt, paths, 3)


# module-level so the forkserver's workers can import them by name
def slow_decode(path, num_frames, *args):
    if "hang" in os.path.basename(path):
        time.sleep(3600)  # what a wedged FFmpeg call looks like from outside
    if "crash" in os.path.basename(path):
        os._exit(3)  # what a segfault in a codec looks like from outside
    return np.full((num_frames, 1), len(path), np.float32), 1


def test_hang_killed_and_crash_replaced():
    names = ["a.mp4", "hang.mp4", "b.mp4", "crash.mp4", "c.mp4", "d.mp4"]
    items = [{"id": n, "video": n, "path": "/x/" + n} for n in names]
    stream = list(video.DecodePool(items, slow_decode, (2,), workers=2, timeout=2.0, capacity=3, ordered=True))
    assert [item["video"] for item, _ in stream] == names  # ordered=True: the items' order, whatever finished first
    got = {item["video"]: message for item, message in stream}
    assert got["hang.mp4"][:2] == ("error", "decode_timeout") and "2 s" in got["hang.mp4"][2]
    assert got["crash.mp4"][:2] == ("error", "decode_crash") and "exit code 3" in got["crash.mp4"][2]
    for n in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):  # decoded by the surviving and the replacement workers
        status, (array, unique) = got[n]
        assert status == "ok" and array.shape == (2, 1) and array[0, 0] == len("/x/" + n)


def cli(ckpt, videos, out, *extra):
    return [sys.executable, os.path.join(REPO, "describe.py"), f"--model={ckpt}", f"--videos={videos}",
            f"--out={out}", f"--num_frames={NUM_FRAMES}", "--max_new_tokens=12", "--batch_size=1",
            "--decode_workers=1", "--progress=False", *extra]


def test_kill_and_resume(ckpt, tmp_path):
    videos = tmp_path / "v"
    videos.mkdir()
    for i in range(10):
        media.write_video(str(videos / f"clip{i}.mp4"), num_frames=4 + i)
    media.write_empty(str(videos / "zero.mp4"))
    out = tmp_path / "d.jsonl"
    # slow enough per video (64 new tokens, batch 1) to be killed mid-run
    proc = subprocess.Popen(cli(ckpt, videos, out, "--max_new_tokens=64"), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (out.exists() and out.read_text().count("\n") >= 2):
        assert proc.poll() is None, f"describe.py exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no record written within 90 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the script, its forkserver and its workers
    proc.wait(timeout=60)
    before = read(out)
    assert 2 <= len(before) < 10, f"killed too late to test resume ({len(before)} records)"
    with open(out, "a") as f:
        f.write('{"id": "' + before[0]["id"][:5])  # a torn line, as a kill mid-write leaves it
    subprocess.run(cli(ckpt, videos, out, "--max_new_tokens=64"), cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    recs = by_id(read(out))
    assert sorted(r["video"] for r in recs.values()) == sorted(f"clip{i}.mp4" for i in range(10))
    assert [r for r in read(out)][:len(before)] == before  # what was there stays, untouched
    assert [e["video"] for e in read(describe.errors_path(str(out)))] == ["zero.mp4"]
    clean = tmp_path / "clean.jsonl"  # the same descriptions as an uninterrupted run
    subprocess.run(cli(ckpt, videos, clean, "--max_new_tokens=64"), cwd=tmp_path, check=True, capture_output=True,
                   timeout=300)
    assert {r["id"]: r["description"] for r in read(clean)} == {i: r["description"] for i, r in recs.items()}


def test_torchrun_two_ranks(ckpt, folder, tmp_path):
    single = tmp_path / "single.jsonl"
    describe.run(config(ckpt, folder, single, batch_size=1))
    out = tmp_path / "d.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(torchrun + cli(ckpt, folder, out)[1:], cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert by_id(read(out)) == by_id(read(single))
    assert by_id(read(describe.errors_path(str(out)))).keys() == by_id(read(describe.errors_path(str(single)))).keys()
    assert records.part_paths(str(out)) == [] and records.part_paths(describe.errors_path(str(out))) == []
    summary = json.load(open(str(out) + ".summary.json"))
    assert summary["ranks"] == 2 and summary["done"] == len(GOOD) and summary["failed"] == len(BROKEN)


def test_empty_description_is_a_failure(ckpt, folder, tmp_path):
    """A model that stops at once (every id a stop id here) writes no record; the video goes to the errors file."""
    from model import VLM
    from tokenizer import Tokenizer
    vlm, tok = VLM.from_pretrained(ckpt), Tokenizer.from_pretrained(ckpt)
    tok.stop_ids = tuple(range(vlm.config.text.vocab_size))
    items = [it for it in describe.find_videos(folder) if it["video"] == "plain.mp4"]
    args = (NUM_FRAMES, vlm.config.family, vlm.config.vision.image_size, 1024)
    prompt_ids = tok.video_prompt("Describe.", vlm.num_video_tokens(NUM_FRAMES))
    out, err = records.Writer(str(tmp_path / "d.jsonl")), records.Writer(str(tmp_path / "e.jsonl"))
    counts = describe.describe(video.decode_inline(items, video.decode_video, args), vlm, tok, prompt_ids,
                               ckpt, NUM_FRAMES, out, err, batch_size=2, max_new_tokens=4)
    out.close(), err.close()
    assert counts["done"] == 0 and counts["failed:empty_description"] == 1
    assert read(tmp_path / "d.jsonl") == [] and read(tmp_path / "e.jsonl")[0]["reason"] == "empty_description"
