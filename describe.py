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

Outputs (DESIGN.md): `out` gets {id, video, description, num_frames, unique_frames, model} per described video,
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
import glob
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from multiprocessing import connection

import torch

from configurator import configure, iter_jsonl, print_config, repair_tail, save_config

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
decode_workers = 2  # background decode processes per rank; 0 = decode inline (no timeout)
decode_timeout = 120.0  # seconds one video may take to decode before its worker is killed
retry_errors = False  # True: try ids already in the errors file again
progress = True  # tqdm bar with rate and ETA on rank 0
# ---------------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and k.islower()
            and isinstance(v, (int, float, bool, str))}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ---------------------------------------------------------------------------------------------------------------
# inputs


def video_id(video):
    """Deterministic id of a video from its path relative to video_root (posix separators)."""
    return hashlib.sha1(video.encode("utf-8")).hexdigest()[:16]


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
    if not os.path.isfile(path) and not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path!r} not found; --prompt must name a text file (the user turn)")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text:
        raise ValueError(f"prompt file {path!r} is empty")
    return text


# ---------------------------------------------------------------------------------------------------------------
# append-only JSONL: torn-line repair, streamed reads, resume state, part files


def part_paths(path):
    """Part files that ranks write beside `path` (any world size, including a killed run's)."""
    return sorted(glob.glob(glob.escape(path) + ".rank*"))


def errors_path(out_path):
    return out_path + ".errors.jsonl"


def read_ids(path):
    """Ids in `path` and in its part files."""
    return {rec["id"] for p in [path] + part_paths(path) for rec in iter_jsonl(p, required=("id",))}


def merge_parts(path):
    """Append to `path` every record of its part files whose id it lacks, then remove the parts. Idempotent: a merge
    killed halfway leaves the parts, and the next merge skips what already made it. Returns records added."""
    parts = part_paths(path)
    if not parts:
        return 0
    repair_tail(path)
    seen, added = {rec["id"] for rec in iter_jsonl(path, required=("id",))}, 0
    with open(path, "a", encoding="utf-8") as f:
        for part in parts:
            for rec in iter_jsonl(part, required=("id",)):
                if rec["id"] not in seen:
                    seen.add(rec["id"])
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    added += 1
        f.flush()
        os.fsync(f.fileno())  # the parts are deleted next: their records must be on disk first
    for part in parts:
        os.remove(part)
    return added


class JsonlWriter:
    """Append-only JSONL, one flushed line per record, at most one line per id (ids already in the file skipped)."""

    def __init__(self, path, existing_ids=()):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        repair_tail(path)
        self.path, self.ids = path, set(existing_ids)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec):
        if rec["id"] in self.ids:
            return
        self.ids.add(rec["id"])
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()  # a kill loses nothing written so far

    def close(self):
        self.f.close()


# ---------------------------------------------------------------------------------------------------------------
# decoding: background worker processes with a per-video timeout


def decode_video(path, num_frames, family, image_size, max_side):
    """One video -> (pixel_values float32 numpy (num_frames, 3, S, S), unique_frames). Runs in a worker process."""
    from video import preprocess, read_frames
    frames, info = read_frames(path, num_frames, max_side=max_side)
    return preprocess(frames, family, image_size).numpy(), info["unique_frames"]


def _decode_one(decode_fn, path, decode_args):
    """("ok", result) or ("error", reason, message): what a worker sends back for one video."""
    from video import VideoError
    try:
        return ("ok", decode_fn(path, *decode_args))
    except VideoError as e:
        return ("error", e.reason, str(e))
    except Exception as e:  # PyAV can raise anything on a hostile file: one video's problem, not the run's
        return ("error", "unexpected_error", f"{type(e).__name__}: {e}")


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
            path = conn.recv()
        except (EOFError, OSError):
            return
        if path is None:
            return
        # a pipe per worker, written synchronously: a worker killed mid-send corrupts only its own pipe
        try:
            conn.send(_decode_one(decode_fn, path, decode_args))
        except OSError:  # the main process is gone
            return


def decode_inline(items, decode_fn, decode_args):
    """The baseline: decode in this process, one video after another. Yields (item, message) like DecodePool."""
    for item in items:
        yield item, _decode_one(decode_fn, item["path"], decode_args)


class DecodePool:
    """Decode `items` in `workers` background processes, fed by a thread of this process, so decoding goes on while
    the caller generates (and while it loads the model: work starts at construction). Iterate for (item, message)
    in completion order, message ("ok", result) or ("error", reason, text). At most `capacity` videos are in flight
    or waiting to be consumed (memory bound). A worker busy past `timeout` seconds is killed and replaced
    ("decode_timeout"); one that dies is replaced too ("decode_crash"). close() stops everything."""

    def __init__(self, items, decode_fn, decode_args, workers=2, timeout=120.0, capacity=8):
        import multiprocessing
        import queue
        # forkserver: workers fork from a clean single-threaded server, not from this process (threads, CUDA, torch
        # thread pools), and each starts in milliseconds once the server has imported torch and PyAV
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["__main__", "video"] + ([__name__] if __name__ != "__main__" else []))
        self.items, self.decode_fn, self.decode_args = items, decode_fn, decode_args
        self.workers, self.timeout, self.capacity = workers, timeout, capacity
        self.results, self.stop = queue.Queue(), threading.Event()
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
        return {"proc": proc, "conn": parent, "item": None, "since": 0.0}

    def _retire(self, w, reason, text):
        """Kill worker `w`, record its video as failed with `reason`, return a fresh worker."""
        w["proc"].kill()
        w["proc"].join()
        w["conn"].close()
        self.results.put((w["item"], ("error", reason, text)))
        return self._start()

    def _manage(self):
        pool, results, timeout = [], self.results, self.timeout
        try:
            pool = [self._start() for _ in range(self.workers)]
            todo, exhausted = iter(self.items), False
            while not self.stop.is_set():
                for w in pool:  # feed idle workers while the memory bound allows
                    busy = sum(x["item"] is not None for x in pool)
                    if w["item"] is None and not exhausted and results.qsize() + busy < self.capacity:
                        w["item"] = next(todo, None)
                        if w["item"] is None:
                            exhausted = True
                        else:
                            w["conn"].send(w["item"]["path"])
                            w["since"] = time.monotonic()
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
                        results.put((w["item"], message))
                        w["item"] = None
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


# ---------------------------------------------------------------------------------------------------------------
# generation


def build_prompt(tok, family, prompt_text, num_video_tokens):
    """Prompt ids for one video: the family's chat template with the video before the text, <video> expanded."""
    from tokenizer import chat_prompt
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt_text}]}]
    return tok.encode_prompt(chat_prompt(family, messages), num_video_tokens)


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
    the other ranks)."""
    import torch.distributed as dist

    from model import VLM, parse_config
    from tokenizer import Tokenizer
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

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = cfg["device"]
    if world > 1:
        from datetime import timedelta
        if dev.startswith("cuda"):
            dev = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
            torch.cuda.set_device(dev)
        # ranks meet only at the end, possibly hours apart: a long timeout, not the 30-minute default
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo", timeout=timedelta(hours=24))

    # resume state, then this rank's share: every world-th id of the sorted list
    out_path, err_path = cfg["out"], errors_path(cfg["out"])
    done_ids, failed_ids = read_ids(out_path), read_ids(err_path)
    skip = done_ids if cfg["retry_errors"] else done_ids | failed_ids
    mine = [it for it in items[rank::world] if it["id"] not in skip]
    skipped = sum(it["id"] in skip for it in items[rank::world])
    suffix = f".rank{rank}" if world > 1 else ""
    writer = JsonlWriter(out_path + suffix, done_ids)
    error_writer = JsonlWriter(err_path + suffix, failed_ids)
    if rank == 0:
        print(f"{len(items)} videos; this rank: {len(mine)} to describe, {skipped} already done or failed; "
              f"{world} rank(s)")

    # decoding starts now, so it overlaps loading the model
    t0 = time.time()
    decode_args = (cfg["num_frames"], model_config.family, model_config.vision.image_size, cfg["max_side"])
    if cfg["decode_workers"] > 0 and mine:
        stream = DecodePool(mine, decode_video, decode_args, cfg["decode_workers"], cfg["decode_timeout"],
                            capacity=2 * cfg["batch_size"] + cfg["decode_workers"])
    else:
        stream = decode_inline(mine, decode_video, decode_args)
    counts, bar, t1 = Counter(), None, time.time()
    try:
        if mine:  # a rerun with nothing left loads no model
            vlm = VLM.from_pretrained(cfg["model"], device=dev, dtype=DTYPES[cfg["dtype"]]).eval()
            prompt_ids = build_prompt(tok, model_config.family, prompt_text, vlm.num_video_tokens(cfg["num_frames"]))
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
    summary = None
    if rank == 0:
        merge_parts(out_path)
        merge_parts(err_path)
        failed = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("failed:")}
        summary = {"videos": len(items), "done": counts["done"], "skipped": counts["skipped"],
                   "failed": sum(failed.values()), "failed_by_reason": failed, "ranks": world,
                   "seconds": round(seconds, 2), "load_seconds": round(t1 - t0, 2),
                   "videos_per_s": round(counts["done"] / seconds, 3) if seconds > 0 else None}
        with open(out_path + ".summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        print(f"done {summary['done']}, skipped {summary['skipped']} (already present), failed {summary['failed']} "
              f"{failed or ''}, {summary['videos_per_s']} videos/s over {seconds:.1f} s -> {out_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    config = configure(DEFAULTS, sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0:
        print("describe.py config:")
        print_config(config)
        save_config(config, config["out"] + ".config.json")
    try:
        run(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
