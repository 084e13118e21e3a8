"""
Resumable records: the one way every script and importer reads and writes its JSONL outputs, JSON summaries and ids.

Outputs are append-only JSONL, one object per line, flushed per record, so a kill loses at most the record being
written. `Writer` cuts the torn last line such a kill leaves before appending, and skips ids it has already written;
`iter_records` / `read_records` stream a file back (a torn, unterminated last line is skipped; any other bad line is
an error naming the file and line). `write_json` is the atomic write for summaries and configs (temp file + rename).

Any text a model or an endpoint produced can reach a record, including lone surrogates (`'\\ud83d'`, half an emoji
cut by a proxy) that UTF-8 cannot encode: such a record is written with ASCII escapes, which json reads back to the
same string, instead of stopping the run.

Ids are deterministic so that reruns dedupe: `video_id` from a video's path relative to `video_root`, `pair_id`
from a video id and the normalized query, `stable_hash` for anything else that must agree across processes.
"""
import glob
import hashlib
import json
import os
import re


def stable_hash(*parts):
    """A hex digest that is the same in every process and run (Python's hash() is salted per process)."""
    return hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8", "surrogatepass")).hexdigest()


def video_id(video):
    """Deterministic id of a video from its path relative to video_root (posix separators)."""
    return hashlib.sha1(video.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def norm_video(path):
    """A video path as ids and split checks compare it: normalized, posix separators."""
    return os.path.normpath(path).replace(os.sep, "/")


def normalize_query(query):
    """Lower case, punctuation to spaces, whitespace collapsed: 'How do I do this?' == 'how do i do this'."""
    return " ".join(re.sub(r"[^\w\s]", " ", query.lower()).split())


def pair_id(video_id, query):
    """Deterministic: the same video and (normalized) query give the same id on every run."""
    return stable_hash(video_id, normalize_query(query))[:16]


def dumps(rec, **kw):
    """One JSON text, human-readable UTF-8 when it can be encoded, ASCII escapes when it holds lone surrogates."""
    text = json.dumps(rec, ensure_ascii=False, **kw)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return json.dumps(rec, ensure_ascii=True, **kw)


def repair_tail(path):
    """Truncate a torn last line (a kill mid-write) so appends start on a fresh line. Reads only the file's tail."""
    if not path or not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == end and chunk.endswith(b"\n"):
                return  # intact
            k = chunk.rfind(b"\n")
            if k >= 0:
                f.truncate(pos - step + k + 1)
                return
            pos -= step
        f.truncate(0)  # a single torn line and nothing else


def iter_records(path, required=()):
    """Records of a JSONL file, streamed. An unparseable unterminated last line (torn by a kill) is skipped; any other
    bad line, or a record lacking a `required` field, is an error naming the file and line."""
    if not path or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                if not line.endswith("\n"):
                    return  # the last line, torn
                raise ValueError(f"{path}:{i + 1} is not valid JSON; fix or remove that line")
            missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise ValueError(f"{path}:{i + 1} lacks required fields {missing}")
            yield rec


def read_records(path, required=()):
    return list(iter_records(path, required))


def read_ids(path):
    """The `id`s in `path` and in its part files (a torchrun run's per-rank outputs)."""
    return {rec["id"] for p in [path] + part_paths(path) for rec in iter_records(p, required=("id",))}


class Writer:
    """Append-only JSONL, one flushed line per record. With `dedupe`, at most one line per id: ids already written are
    skipped (`existing_ids` when the caller has them, else read from the file). `fsync=True` also forces each line to disk (for files whose records must
    survive a power cut, not only a kill). A context manager; `write` returns whether the record was written."""

    def __init__(self, path, dedupe=True, existing_ids=None, fsync=False):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        repair_tail(path)
        self.path, self.dedupe, self.fsync = path, dedupe, fsync
        if existing_ids is None:
            existing_ids = {r["id"] for r in iter_records(path) if "id" in r} if dedupe else ()
        self.ids = set(existing_ids)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec):
        if self.dedupe:
            if rec["id"] in self.ids:
                return False
            self.ids.add(rec["id"])
        self.f.write(dumps(rec) + "\n")
        self.f.flush()  # a kill loses nothing written so far
        if self.fsync:
            os.fsync(self.f.fileno())
        return True

    def close(self):
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically: readers see the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_records(path, records):
    """Write a whole JSONL file atomically (derived files such as a train/held-out split: complete or absent)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# part files: under torchrun each rank appends to `<path>.rank{r}`; rank 0 folds them into `path` at the end


def part_path(path, rank, world):
    return f"{path}.rank{rank}" if world > 1 else path


def part_paths(path):
    """Part files that ranks write beside `path` (any world size, including a killed run's)."""
    return sorted(glob.glob(glob.escape(path) + ".rank*"))


def merge_parts(path):
    """Append to `path` every record of its part files whose id it lacks, then remove the parts. Idempotent: a merge
    killed halfway leaves the parts, and the next merge skips what already made it. Returns records added."""
    parts = part_paths(path)
    if not parts:
        return 0
    added = 0
    with Writer(path, fsync=False) as w:
        for part in parts:
            for rec in iter_records(part, required=("id",)):
                added += w.write(rec)
        os.fsync(w.f.fileno())  # the parts are deleted next: their records must be on disk first
    for part in parts:
        os.remove(part)
    return added
