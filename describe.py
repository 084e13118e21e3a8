"""
Videos -> descriptions.jsonl: the video LLM writes a detailed, factual, safety-aware description of each video (the
SafeVid stage that turns pixels into text for generate_pairs.py).

    python describe.py [config/x.py] --model=ckpt_dir --videos=data/videos --out=out/descriptions.jsonl
    torchrun --nproc_per_node=8 describe.py --model=... --device=cuda --dtype=bfloat16 ...

Inputs (`videos`): a directory searched recursively for `extensions`; a `.jsonl` file whose lines carry a `video`
field; or any other text file, one path per line (blank lines and `#` comments skipped). Relative paths resolve
against `video_root` ("" = the directory itself for a directory input, the current directory for a list). A
record's `video` is its path relative to `video_root` (absolute when outside it) and its `id` the first 16 hex
digits of sha1(video), so the same file always gets the same id.

Outputs: `out` gets {id, video, description, num_frames, unique_frames, model} per described video,
appended and flushed per record; failures go to `<out>.errors.jsonl` as {id, video, error, reason}, `reason` one of
video.REASONS (not_found, empty_file, open_error, no_video_stream, decode_error, truncated, no_frames) or
decode_timeout (a decode that ran past `decode_timeout` s, its worker killed), decode_crash (the worker died, e.g.
a segfault in FFmpeg), unexpected_error (any other exception while decoding), empty_description (the model
stopped at once). Also `<out>.config.json` and `<out>.summary.json` (done, skipped, failed by reason, videos/s).

Frames: `num_frames` uniformly in time (video.read_frames); a clip with fewer frames repeats them, so the model
always sees `num_frames` and the record counts the distinct ones in `unique_frames`. Frames are scaled down to
`max_side` while decoding, so memory stays bounded whatever the resolution.

Resume: a rerun skips every id already in `out` (or in a part file of a killed torchrun) and every id already in
the errors file: a broken file stays broken. `retry_errors=True` tries the failed ids again (e.g. after
decode_timeouts on an overloaded machine); the errors file keeps at most one line per id (the first failure), so
with retries an id can be both there and, once it succeeds, in `out` -- `out` is what counts. A torn last line (a
kill mid-write) is truncated before appending. At most the batch in flight is lost by a kill, never duplicated.

Throughput: `decode_workers` background processes read and preprocess frames while the model generates batches of
`batch_size` with the KV cache. A process, not a thread, because a hung PyAV/FFmpeg call can only be stopped by
killing its process: a worker past `decode_timeout` is killed, replaced, and its video recorded. decode_workers=0
decodes inline in the main process (no timeout possible; the benchmark's baseline).

Scale: under torchrun, rank r takes every world_size-th id of the sorted list and writes `<out>.rank{r}` (errors:
`<errors>.rank{r}`); after all ranks finish, rank 0 folds the parts into `out` / errors (skipping ids already
there, so a merge interrupted halfway is finished by the next run) and removes them. Progress bar on rank 0.
"""
import json
import os
import sys
import time
from collections import Counter

import torch

from configurator import defaults_of, main, repo_path
from records import Writer, merge_parts, part_path, read_ids, video_id

# ---------------------------------------------------------------------------------------------------------------
# config: defaults, overridden by config/*.py and --key=value
model = ""  # Hugging Face checkpoint directory (llava_onevision or llava_next_video)
videos = ""  # a directory (searched recursively), a .jsonl with a `video` field, or a text file of paths
video_root = ""  # relative video paths resolve against this; "" -> the `videos` directory, or the cwd for a list
extensions = ".mp4,.mkv,.webm,.mov,.avi,.m4v,.mpg,.mpeg,.ts,.flv,.wmv,.3gp"  # for a directory, case-insensitive
out = "out/descriptions.jsonl"
prompt = "data/prompts/describe.txt"  # the user turn; the video goes before it, as in the HF chat template
num_frames = 8  # frames per video, uniform in time; LLaVA-OneVision-7B was trained with up to 32
max_side = 1024  # frames larger than this (longer side, px) are scaled down while decoding
batch_size = 4  # videos per generate call (all share one prompt length: no padding)
max_new_tokens = 512
temperature = 0.0  # 0 = greedy
top_p = 1.0
seed = 1337  # sampling seed (temperature > 0), offset per batch
device = "cpu"  # "cuda" -> cuda:LOCAL_RANK under torchrun
dtype = "float32"  # float32 | bfloat16 | float16
attn_impl = "auto"  # "auto": Triton attention on CUDA, the reference on CPU; "sdpa": PyTorch SDPA (the fallback)
decode_workers = 2  # background decode processes per rank; 0 = decode inline (no timeout)
decode_timeout = 120.0  # seconds one video may take to decode before its worker is killed
retry_errors = False  # True: try ids already in the errors file again
progress = True  # tqdm bar with rate and ETA on rank 0
# ---------------------------------------------------------------------------------------------------------------
DEFAULTS = defaults_of(globals())

# ---------------------------------------------------------------------------------------------------------------
# inputs


def _item(path, root):
    """{id, video, path}: `path` as listed (a relative one is under `root`); `video` is the listed path, or for an
    absolute path inside `root`, the part below `root`."""
    full = os.path.normpath(os.path.join(root, path))  # join keeps an absolute path as is; root "" -> the cwd
    video = os.path.normpath(path)
    if root and os.path.isabs(path) and not os.path.relpath(full, root).startswith(".."):
        video = os.path.relpath(full, root)
    video = video.replace(os.sep, "/")
    return {"id": video_id(video), "video": video, "path": full}


def find_videos(videos, video_root="", extensions=DEFAULTS["extensions"]):
    """The videos to describe, as [{id, video, path}] sorted by id, duplicates (same relative path) dropped."""
    if not videos:
        raise ValueError("no videos given: set --videos to a directory, a .jsonl with a `video` field, or a text "
                         "file with one path per line")
    if not os.path.exists(videos):
        raise FileNotFoundError(f"videos {videos!r} not found: point --videos at a directory, a .jsonl or a list")
    if os.path.isdir(videos):
        root = video_root or videos
        exts = tuple(e.strip().lower() for e in extensions.split(",") if e.strip())
        paths = []
        for folder, dirs, files in os.walk(videos):
            dirs.sort()
            paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(exts)]
        paths = [os.path.relpath(p, root) for p in paths]
    else:
        root, paths = video_root, []
        with open(videos, encoding="utf-8") as f:
            for i, line in enumerate(f):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if videos.endswith(".jsonl"):
                    try:
                        video = json.loads(line).get("video")
                    except (ValueError, AttributeError):
                        video = None
                    if not isinstance(video, str) or not video:
                        raise ValueError(f"{videos}:{i + 1} has no `video` string field; each line must be a JSON "
                                         "object like {\"video\": \"path/to/clip.mp4\"}")
                    line = video
                paths.append(line)
    items = {}
    for p in paths:
        item = _item(p, root)
        items.setdefault(item["id"], item)
    if not items:
        raise ValueError(f"found no videos in {videos!r} (extensions {extensions}); check --videos / --extensions")
    return sorted(items.values(), key=lambda it: it["id"])


def load_prompt(path):
    """The prompt text; a relative path is tried as given, then inside this repository (the default works anywhere)."""
    path = repo_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} not found; --prompt must name a text file (the user turn)")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        raise ValueError(f"prompt file {path!r} is empty")
    return text


def errors_path(out_path):
    return out_path + ".errors.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# generation


def describe_batch(vlm, tok, prompt_ids, pixel_values, max_new_tokens, temperature=0.0, top_p=1.0, seed=None):
    """pixel_values (B, F, 3, S, S) -> B descriptions (str), one shared prompt, batched KV-cache generation."""
    pixel_values = pixel_values.to(vlm.lm_head_weight.device, vlm.lm_head_weight.dtype)
    new_ids = vlm.generate([prompt_ids] * pixel_values.shape[0], pixel_values_videos=pixel_values,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_ids=tok.stop_ids, seed=seed)
    return [tok.decode(ids, skip_special=True).strip() for ids in new_ids]


def describe(stream, vlm, tok, prompt_ids, model_name, num_frames, writer, error_writer, batch_size,
             max_new_tokens, temperature=0.0, top_p=1.0, seed=None, bar=None):
    """Consume `stream` ((item, message) pairs from DecodePool or decode_inline), generate per batch of `batch_size`
    decoded videos, write records and errors as they come. Returns counts."""
    counts, batch = Counter(), []

    def flush():
        pixel_values = torch.stack([torch.from_numpy(pv) for _, (pv, _) in batch])  # (B, F, 3, S, S)
        batch_seed = None if seed is None else seed + counts["batches"]
        texts = describe_batch(vlm, tok, prompt_ids, pixel_values, max_new_tokens, temperature, top_p, batch_seed)
        for (item, (_, unique)), text in zip(batch, texts):
            if not text:  # nothing for the pair generator to read: a failure, retried with --retry_errors
                error_writer.write({"id": item["id"], "video": item["video"], "reason": "empty_description",
                                    "error": "the model stopped before writing anything"})
                counts["failed:empty_description"] += 1
                continue
            writer.write({"id": item["id"], "video": item["video"], "description": text, "num_frames": num_frames,
                          "unique_frames": int(unique), "model": model_name})
            counts["done"] += 1
        counts["batches"] += 1
        if bar is not None:
            bar.update(len(batch))
        batch.clear()

    for item, message in stream:
        if message[0] == "ok":
            batch.append((item, message[1]))
            if len(batch) == batch_size:
                flush()
        else:
            _, reason, text = message
            error_writer.write({"id": item["id"], "video": item["video"], "error": text, "reason": reason})
            counts["failed:" + reason] += 1
            if bar is not None:
                bar.update(1)
    if batch:
        flush()
    return counts


# ---------------------------------------------------------------------------------------------------------------
# the run


def run(config):
    """Describe every video of config["videos"] not yet done; returns the summary dict (global, on rank 0; None on
    the other ranks). Status "done" when every video is described or recorded as failed: failures are permanent
    until a rerun with retry_errors=True."""
    import torch.distributed as dist

    from model import DTYPES, VLM, parse_config, setup_runtime
    from tokenizer import Tokenizer
    from video import decode_stream
    cfg = config
    # config errors first, before any work or process group
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype {cfg['dtype']!r} is not one of {', '.join(DTYPES)}")
    for key in ("num_frames", "batch_size", "max_new_tokens"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["decode_workers"] < 0 or cfg["decode_timeout"] <= 0:
        raise ValueError("decode_workers must be >= 0 and decode_timeout > 0")
    if not cfg["model"] or not os.path.isfile(os.path.join(cfg["model"], "config.json")):
        raise FileNotFoundError(f"model {cfg['model']!r} has no config.json; --model must be a Hugging Face "
                                "checkpoint directory (config.json, safetensors, tokenizer.json)")
    prompt_text = load_prompt(cfg["prompt"])
    items = find_videos(cfg["videos"], cfg["video_root"], cfg["extensions"])
    with open(os.path.join(cfg["model"], "config.json")) as f:
        model_config = parse_config(json.load(f))
    tok = Tokenizer.from_pretrained(cfg["model"])
    # ranks meet only at the end, possibly hours apart: a long timeout, not the 30-minute default
    rank, world, device, dtype = setup_runtime(cfg["device"], cfg["dtype"], timeout_minutes=24 * 60)

    # resume state, then this rank's share: every world-th id of the sorted list
    out_path, err_path = cfg["out"], errors_path(cfg["out"])
    done_ids, failed_ids = read_ids(out_path), read_ids(err_path)
    skip = done_ids if cfg["retry_errors"] else done_ids | failed_ids
    mine = [it for it in items[rank::world] if it["id"] not in skip]
    skipped = sum(it["id"] in skip for it in items[rank::world])
    writer = Writer(part_path(out_path, rank, world), existing_ids=done_ids)
    error_writer = Writer(part_path(err_path, rank, world), existing_ids=failed_ids)
    if rank == 0:
        print(f"{len(items)} videos; this rank: {len(mine)} to describe, {skipped} already done or failed; "
              f"{world} rank(s)")

    # decoding starts now, so it overlaps loading the model
    t0 = time.time()
    decode_args = (cfg["num_frames"], model_config.family, model_config.vision.image_size, cfg["max_side"])
    stream = decode_stream(mine, decode_args, cfg["decode_workers"], cfg["decode_timeout"],
                           capacity=2 * cfg["batch_size"] + cfg["decode_workers"])
    counts, bar, t1 = Counter(), None, time.time()
    try:
        if mine:  # a rerun with nothing left loads no model
            vlm = VLM.from_pretrained(cfg["model"], device=device, dtype=dtype, attn_impl=cfg["attn_impl"])
            prompt_ids = tok.video_prompt(prompt_text, vlm.num_video_tokens(cfg["num_frames"]), cfg["num_frames"])
            t1 = time.time()
            if rank == 0 and cfg["progress"]:
                from tqdm import tqdm
                bar = tqdm(total=len(mine), unit="video", desc="describe (rank 0)", dynamic_ncols=True)
            counts = describe(stream, vlm, tok, prompt_ids, cfg["model"], cfg["num_frames"], writer, error_writer,
                              cfg["batch_size"], cfg["max_new_tokens"], cfg["temperature"], cfg["top_p"],
                              cfg["seed"] if cfg["temperature"] > 0 else None, bar)
    finally:
        stream.close()
        writer.close()
        error_writer.close()
        if bar is not None:
            bar.close()
    seconds = time.time() - t1
    counts["skipped"] = skipped
    counts.pop("batches", None)
    if world > 1:  # also the barrier: every rank has closed its parts before rank 0 merges them
        gathered = [None] * world
        dist.all_gather_object(gathered, (dict(counts), seconds))
        counts = sum((Counter(c) for c, _ in gathered), Counter())
        seconds = max(s for _, s in gathered)
    if rank != 0:
        return None
    merge_parts(out_path)
    merge_parts(err_path)
    failed = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("failed:")}
    summary = {"status": "done", "videos": len(items), "done": counts["done"], "skipped": counts["skipped"],
               "failed": sum(failed.values()), "failed_by_reason": failed, "ranks": world,
               "seconds": round(seconds, 2), "load_seconds": round(t1 - t0, 2),
               "videos_per_s": round(counts["done"] / seconds, 3) if seconds > 0 else None}
    print(f"done {summary['done']}, skipped {summary['skipped']} (already present), failed {summary['failed']} "
          f"{failed or ''}, {summary['videos_per_s']} videos/s over {seconds:.1f} s -> {out_path}")
    return summary


if __name__ == "__main__":
    sys.exit(main("describe.py", DEFAULTS, run, sys.argv[1:],
                  lambda c: (c["out"] + ".config.json", c["out"] + ".summary.json")))
