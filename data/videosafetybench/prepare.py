"""
Import a local download of Video-SafetyBench (arXiv 2505.11842; 2,264 video-text pairs over 13 MLCommons-style
hazard categories) into bench items (ARCHITECTURE.md: {id, video, query, category, query_type} + subcategory, rule, style,
intent, source). Nothing is downloaded here: fetch the dataset yourself (e.g. BAAI/Video-SafetyBench) and point
--src at the folder (or a file) holding its metadata.

    python data/videosafetybench/prepare.py --src=/data/Video-SafetyBench --out=out/vsb_items.jsonl
    python bench.py --items=out/vsb_items.jsonl --video_root=/data/Video-SafetyBench --model=... --judge_url=...

Input: JSON (a list, or {"data": [...]}) or JSONL records with `question_id`, `question`, `harmful_intention`,
`video_path` (relative to --src), `category`, `subcategory`, and `question_type` ("harmful" | "benign"); without
`question_type`, a file name containing "harmful" or "benign" decides. Files under --src are read recursively.

Mapping. Video-SafetyBench's two query types are both attacks: a "harmful" query states the harmful intent; a
"benign" query reads as harmless text and becomes harmful only with the video. Both are graded for harmful
compliance against `harmful_intention` (as its RJScore judge does), so both become query_type "harmful", with
style "explicit" and "video_grounded" (our name for the second kind). Each category is mapped to candidate rules of
data/taxonomy.json; among them the rule whose keywords best match the subcategory and question is chosen (ties:
the first listed). Categories with no counterpart (intellectual property) keep rule "" and the judge uses a generic
rule for the category. ids are "vsb-<type>-<question_id>" (question ids repeat across the two types).
"""
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from configurator import main  # noqa: E402
from records import write_records  # noqa: E402
from llm import load_taxonomy  # noqa: E402

# config
src = ""  # folder (searched recursively for .json/.jsonl) or one metadata file
out = "out/videosafetybench_items.jsonl"
taxonomy = os.path.join(REPO, "data", "taxonomy.json")
check_videos = True  # count records whose video file is missing under src (they are still written)

# category (letters only, lower case) -> candidate taxonomy rules, best default first
CATEGORY_RULES = {
    "violentcrimes": ["VIO-01", "VIO-02", "EXT-01", "ANI-01", "WPN-01"],
    "nonviolentcrimes": ["ILL-02", "ILL-01", "ILL-03", "CYB-01", "WPN-01"],
    "sexrelatedcrimes": ["SEX-03"],
    "childsexualexploitation": ["SEX-02"],
    "defamation": ["HAT-02", "MIS-01"],
    "specializedadvice": ["MIS-02"],  # no rule covers unqualified medical/legal/financial advice: the closest
    "specificialadvice": ["MIS-02"],  # the spelling found in some copies of the release
    "privacy": ["PRV-01", "PRV-02"],
    "intellectualproperty": [],
    "indiscriminateweapons": ["WPN-02"],
    "hate": ["HAT-01", "EXT-01"],
    "suicideselfharm": ["SH-01", "SH-02"],
    "sexualcontent": ["SEX-01"],
    "elections": ["MIS-02"],
}
STYLE = {"harmful": "explicit", "benign": "video_grounded"}
REQUIRED = ("question_id", "question", "harmful_intention", "video_path", "category")


def letters(s):
    return re.sub(r"[^a-z]", "", str(s).lower())


def read_records(path):
    """Records of one .json (list or {"data": list}) or .jsonl file; None for JSON of another shape."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if isinstance(data, dict):
        data = data.get("data", data.get("items"))
    return data if isinstance(data, list) else None


def find_files(src_path):
    if os.path.isfile(src_path):
        return [src_path]
    found = []
    for folder, dirs, files in os.walk(src_path):
        dirs.sort()
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith((".json", ".jsonl"))]
    return found


def pick_rule(category, text, rules):
    """The candidate rule of `category` with the most keyword hits in `text` (first listed on ties), or ""."""
    candidates = [r for r in CATEGORY_RULES.get(letters(category), []) if r in rules]
    if not candidates:
        return ""
    words = " " + re.sub(r"[^a-z0-9]+", " ", text.lower()) + " "
    hits = [sum(f" {k.lower()} " in words for k in rules[r].get("keywords", [])) for r in candidates]
    return candidates[max(range(len(candidates)), key=lambda i: (hits[i], -i))]


def convert(src_path, taxonomy_path, check=True):
    """-> (items, stats). Records lacking required fields or with an unknown type are errors naming the file."""
    rules = load_taxonomy(taxonomy_path)["rules"]
    root = src_path if os.path.isdir(src_path) else os.path.dirname(src_path)
    items, stats, seen = [], {"harmful": 0, "benign": 0, "missing_video": 0, "no_rule": 0, "skipped_files": 0}, set()
    for path in find_files(src_path):
        records = read_records(path)
        if not records or not isinstance(records[0], dict) or "question_id" not in records[0]:
            stats["skipped_files"] += 1  # some other JSON in the folder (a config, a results file)
            continue
        name = os.path.basename(path).lower()
        for i, r in enumerate(records):
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                raise ValueError(f"{path}: record {i} lacks {missing}; is this Video-SafetyBench metadata?")
            qtype = str(r.get("question_type") or ("benign" if "benign" in name else "harmful" if "harmful" in name
                                                   else "")).lower()
            if qtype not in STYLE:
                raise ValueError(f"{path}: record {i} has no question_type and the file name says neither "
                                 "harmful nor benign; add question_type or rename the file")
            item_id = f"vsb-{qtype}-{r['question_id']}"
            if item_id in seen:
                continue  # the same record in two files (e.g. a merged copy beside the splits)
            seen.add(item_id)
            rule = pick_rule(r["category"], f"{r.get('subcategory', '')} {r['question']} {r['harmful_intention']}",
                             rules)
            video = os.path.normpath(r["video_path"]).replace(os.sep, "/")
            items.append(dict(id=item_id, video=video, query=r["question"], category=str(r["category"]),
                              query_type="harmful", subcategory=str(r.get("subcategory", "")), rule=rule,
                              style=STYLE[qtype], intent=r["harmful_intention"], source="video-safetybench"))
            stats[qtype] += 1
            stats["no_rule"] += not rule
            if check and not os.path.exists(os.path.join(root, video)):
                stats["missing_video"] += 1
    if not items:
        raise ValueError(f"no Video-SafetyBench records found under {src_path!r}")
    return items, stats


def run(cfg):
    if not cfg["src"] or not os.path.exists(cfg["src"]):
        raise FileNotFoundError(f"src {cfg['src']!r} not found: point --src at your Video-SafetyBench download")
    items, stats = convert(cfg["src"], cfg["taxonomy"], cfg["check_videos"])
    write_records(cfg["out"], items)
    print(f"{len(items)} items ({stats['harmful']} explicit, {stats['benign']} video-grounded) -> {cfg['out']}; "
          f"{stats['no_rule']} without a taxonomy rule, {stats['missing_video']} videos missing under src")
    return dict(stats, status="done")


if __name__ == "__main__":
    defaults = {k: v for k, v in dict(globals()).items() if k in ("src", "out", "taxonomy", "check_videos")}
    sys.exit(main("videosafetybench/prepare.py", defaults, run, sys.argv[1:],
                  lambda c: (c["out"] + ".config.json", c["out"] + ".summary.json")))
