"""
Import a local download of Video-MME (arXiv 2405.21075; 900 videos, 2,700 four-option questions, short / medium /
long) into MCQ items for `bench.py --mcq` ({id, video, question, options, answer} + task, duration, domain, source).
Nothing is downloaded here: fetch the release yourself (lmms-lab/Video-MME) and point --src at its folder.

    python data/videomme/prepare.py --src=/data/Video-MME --out=out/videomme_mcq.jsonl
    python bench.py --mcq=out/videomme_mcq.jsonl --video_root=/data/Video-MME --model=out/dpo/final --out_dir=out/vmme

Input, as the release publishes it: records with `video_id`, `duration`, `domain`, `sub_category`, `url`, `videoID`
(the YouTube id, the video's file name), `question_id`, `task_type`, `question`, `options` (["A. ...", "B. ...",
...]) and `answer` (the letter), in videomme/test-*.parquet (needs pyarrow) or exported as .json / .jsonl; the
videos as `data/<videoID>.mp4` (any folder under src; .mp4, .mkv, .webm tried). The "A. " prefixes are stripped
(the bench letters the options itself). Records whose video is not found are skipped and counted.
ids are "videomme-<question_id>".
"""
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from configurator import main  # noqa: E402
from records import iter_records, write_records  # noqa: E402

# config
src = ""  # the Video-MME folder (metadata and videos)
out = "out/videomme_mcq.jsonl"

REQUIRED = ("videoID", "question_id", "task_type", "question", "options", "answer")
VIDEO_EXT = (".mp4", ".mkv", ".webm")


def read_metadata(path):
    if path.endswith(".parquet"):
        try:
            import pandas
            return pandas.read_parquet(path).to_dict("records")
        except ImportError as e:
            raise ValueError(f"reading {path} needs pandas and pyarrow ({e}): pip install pandas pyarrow, or export "
                             "the table to JSON") from None
    if path.endswith(".jsonl"):
        return list(iter_records(path))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, list) else []


def convert(src_path):
    """-> (items, counts). Every .parquet/.json/.jsonl under src whose records carry Video-MME's fields."""
    videos, meta = {}, []
    for dirpath, _, files in os.walk(src_path):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(dirpath, f), src_path).replace(os.sep, "/")
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXT:
                videos.setdefault(stem, rel)
            elif ext in (".parquet", ".json", ".jsonl"):
                meta.append(os.path.join(dirpath, f))
    items, counts = [], dict(items=0, missing_video=0, skipped_files=0)
    for path in sorted(meta):
        records = read_metadata(path)
        if not records or not all(isinstance(r, dict) and all(k in r for k in REQUIRED) for r in records):
            counts["skipped_files"] += 1
            continue
        for r in records:
            if r["videoID"] not in videos:
                counts["missing_video"] += 1
                continue
            options = [re.sub(r"^\s*[A-Z][.)]\s*", "", str(o)) for o in list(r["options"])]
            items.append(dict(id=f"videomme-{r['question_id']}", video=videos[r["videoID"]], question=r["question"],
                              options=options, answer=str(r["answer"]).strip(), task=r["task_type"],
                              duration=r.get("duration", ""), domain=r.get("domain", ""), source="videomme"))
    counts["items"] = len(items)
    if not items:
        raise ValueError(f"no Video-MME records with a video found under {src_path!r}")
    return items, counts


def run(cfg):
    if not cfg["src"] or not os.path.isdir(cfg["src"]):
        raise FileNotFoundError(f"src {cfg['src']!r} not found: point --src at your Video-MME download")
    items, counts = convert(cfg["src"])
    write_records(cfg["out"], items)
    print(f"{counts['items']} MCQ items -> {cfg['out']}; {counts['missing_video']} records skipped (video not found "
          f"under src), {counts['skipped_files']} other files ignored")
    return dict(counts, status="done")


if __name__ == "__main__":
    defaults = dict(src=src, out=out)
    sys.exit(main("videomme/prepare.py", defaults, run, sys.argv[1:],
                  lambda c: (c["out"] + ".config.json", c["out"] + ".summary.json")))
