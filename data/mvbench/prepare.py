"""
Import a local download of MVBench (arXiv 2311.17005; 20 temporal tasks x 200 multiple-choice questions) into MCQ
items for `bench.py --mcq` ({id, video, question, options, answer} + task, start, end, source). Nothing is downloaded
here: fetch the release yourself (OpenGVLab/MVBench) and point --src at its folder.

    python data/mvbench/prepare.py --src=/data/MVBench --out=out/mvbench_mcq.jsonl
    python bench.py --mcq=out/mvbench_mcq.jsonl --video_root=/data/MVBench --model=out/dpo/final --out_dir=out/mvb

Input, as the release lays it out: `json/<task>.json`, each a list of {"video", "question", "candidates" (the
options), "answer" (the correct candidate's text)}, some with "start"/"end" seconds; the videos under `video/<source
dataset>/...`, where `video` is the path below the source's folder. The folder of each task's source is found by
looking the file up under src (the release's own loader hard-codes it per task). Records whose video is not found
-- or is a folder of frames, as for the TVQA task -- are skipped and counted. `start`/`end` are kept on the item;
the bench samples frames over the whole clip. ids are "mvbench-<task>-<index in the task file>".
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from configurator import main  # noqa: E402
from records import write_records  # noqa: E402

# config
src = ""  # the MVBench folder (json/ and video/)
out = "out/mvbench_mcq.jsonl"


def video_index(src_path):
    """Every file under src/video, by its path relative to src (posix)."""
    root, found = os.path.join(src_path, "video"), []
    for dirpath, _, files in os.walk(root):
        found += [os.path.relpath(os.path.join(dirpath, f), src_path).replace(os.sep, "/") for f in files]
    return found


def convert(src_path):
    """-> (items, counts). Reads json/*.json; resolves each record's video below src/video."""
    json_dir = os.path.join(src_path, "json")
    if not os.path.isdir(json_dir):
        raise FileNotFoundError(f"{json_dir} not found: point --src at the MVBench folder that holds json/ and video/")
    files = video_index(src_path)
    items, counts = [], dict(items=0, missing_video=0, tasks=0)
    for name in sorted(os.listdir(json_dir)):
        if not name.endswith(".json"):
            continue
        task = name[:-len(".json")]
        with open(os.path.join(json_dir, name), encoding="utf-8") as f:
            records = json.load(f)
        counts["tasks"] += 1
        for k, r in enumerate(records):
            missing = [key for key in ("video", "question", "candidates", "answer") if key not in r]
            if missing:
                raise ValueError(f"{name} record {k} lacks {missing}: is this an MVBench json/ file?")
            matches = [p for p in files if p.endswith("/" + r["video"].lstrip("/"))]
            if not matches:
                counts["missing_video"] += 1
                continue
            item = dict(id=f"mvbench-{task}-{k}", video=min(matches, key=len), question=r["question"],
                        options=list(r["candidates"]), answer=r["answer"], task=task, source="mvbench")
            item.update({key: r[key] for key in ("start", "end") if key in r})
            items.append(item)
    counts["items"] = len(items)
    if not items:
        raise ValueError(f"no MVBench records with a video found under {src_path!r}")
    return items, counts


def run(cfg):
    if not cfg["src"] or not os.path.isdir(cfg["src"]):
        raise FileNotFoundError(f"src {cfg['src']!r} not found: point --src at your MVBench download")
    items, counts = convert(cfg["src"])
    write_records(cfg["out"], items)
    print(f"{counts['items']} MCQ items from {counts['tasks']} tasks -> {cfg['out']}; {counts['missing_video']} "
          "records skipped (video not found under src/video)")
    return dict(counts, status="done")


if __name__ == "__main__":
    defaults = dict(src=src, out=out)
    sys.exit(main("mvbench/prepare.py", defaults, run, sys.argv[1:],
                  lambda c: (c["out"] + ".config.json", c["out"] + ".summary.json")))
