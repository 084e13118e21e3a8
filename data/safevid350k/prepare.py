"""
Import a local download of SafeVid-350K (arXiv 2505.11926; hub yxwang/SafeVid-350K, CC-BY-NC-SA-4.0) into our pairs
(ARCHITECTURE.md), and export pairs to TRL preference records. Nothing is downloaded here.

    python data/safevid350k/prepare.py --src=/data/SafeVid-350K --out=out/safevid350k_pairs.jsonl
    python data/safevid350k/prepare.py --mode=trl --src=out/pairs.jsonl --out=out/pairs_trl.jsonl

Layout. The release's file layout was not available when this was written, so columns are detected per record
(names in COLUMNS; nested dicts flattened, a column matching on its last dotted part, shallowest first) from .jsonl,
.json (a list or {"data"|"train"|...: [...]}) and .parquet (needs pyarrow) files found recursively. A value may be a
string, a {"value"|"content"|"text"} dict, a chat (LLaVA `conversations` from/value or role/content with typed
parts: the last user turn is the prompt, the last assistant turn a response) or a list of videos (the first counts).
Video tokens (<video>, <|video_pad|>, ...) are stripped from the prompt. A file whose first record lacks a video,
prompt, chosen or rejected column is an error listing the columns found and those accepted.

Mapping. id = records.pair_id(video id, prompt) with the video id from a `video_id` column, else
records.video_id(video path) as describe.py makes it, so our own pairs and these share one id space. A rule id of
ours in a `rule` column wins; else the subcategory, then the category, is looked up (letters and digits) among our
rule/subcategory/category ids and CATEGORY_MAP: a subcategory, or a category with one rule, gives that rule; a bare
category gives rule "". Unmapped names are kept verbatim (rule "") and counted; the source name stays in
`source_category`. query_type: a query_type-like column through QUERY_TYPE_MAP; else benign for a benign_sensitive
style; else harmful (SafeVid-350K answers adversarial queries). style: a style-like column through STYLE_MAP; else
benign_sensitive for a benign query; else "unknown". Malformed records are counted per reason and skipped.

Resume: pairs are appended and flushed one by one, ids already in `out` are skipped (a torn last line is repaired)
and files are read in sorted order, so a rerun, or a run after a kill, ends with the file a clean run writes.

TRL export (mode=trl): prompt/chosen/rejected, `video` (relative to video_root) and id, video_id, category,
subcategory, rule, style, query_type. "conversational" follows TRL's vision-dataset convention (dataset_formats.md:
typed content parts, media in a list column) with a {"type": "video"} part and a `videos` column -- TRL documents
`images` only, so `videos` is by analogy; "standard" writes plain strings. Both read back through the importer.
"""
import functools
import json
import os
import posixpath
import re
import sys
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import records  # noqa: E402
from configurator import main  # noqa: E402
from llm import load_taxonomy  # noqa: E402
from records import Writer, pair_id  # noqa: E402

# config
mode = "import"  # import: src (SafeVid-350K files) -> out (pairs JSONL); trl: src (pairs JSONL) -> out (TRL JSONL)
src = ""  # folder (searched recursively for .jsonl/.json/.parquet) or one file
out = "out/safevid350k_pairs.jsonl"
taxonomy = os.path.join(REPO, "data", "taxonomy.json")
trl_format = "conversational"  # mode=trl: "conversational" (typed content parts + videos) or "standard" (strings)

# role -> accepted column names, in order of preference
COLUMNS = {
    "video": ("video", "video_path", "videos", "video_file", "video_name", "video_url", "clip", "video_id"),
    "prompt": ("prompt", "question", "query", "instruction", "user_query", "harmful_query", "input",
               "conversations", "conversation", "messages"),
    "chosen": ("chosen", "preferred", "response_chosen", "chosen_response", "safe_response", "accepted", "positive"),
    "rejected": ("rejected", "dispreferred", "response_rejected", "rejected_response", "unsafe_response",
                 "negative"),
    "video_id": ("video_id", "vid_id", "video_uid"),
    "category": ("category", "harm_category", "risk_category", "main_category", "safety_category", "harm_type"),
    "subcategory": ("subcategory", "sub_category", "harm_subcategory", "fine_category", "subtype"),
    "rule": ("rule", "rule_id"),
    "style": ("style", "query_style", "question_style", "attack_type", "attack_style"),
    "query_type": ("query_type", "question_type", "is_harmful", "harmful"),
    "source_id": ("id", "sample_id", "uid", "question_id", "pair_id"),
}
REQUIRED = ("video", "prompt", "chosen", "rejected")
# external names (letters and digits) -> our category / subcategory / rule id; our own ids match themselves
CATEGORY_MAP = {
    "drugs": "ILL-01", "theft": "ILL-02", "fraud": "ILL-03", "hate": "HAT-01", "harassment": "HAT-02",
    "suicide": "SH-01", "eatingdisorders": "SH-02", "firearms": "WPN-01", "surveillance": "PRV-02",
    "violentcrimes": "violence", "physicalharm": "violence", "threatsviolenceharm": "violence",
    "gore": "violence.graphic", "graphicviolence": "violence.graphic", "weapon": "weapons",
    "indiscriminateweapons": "weapons.cbrne", "explosives": "weapons.cbrne", "selfharm": "self_harm",
    "suicideselfharm": "self_harm", "suicideandselfharm": "self_harm", "dangerousbehavior": "dangerous_acts",
    "dangerouschallenges": "dangerous_acts", "illegalactivities": "illegal_activity", "crime": "illegal_activity",
    "nonviolentcrimes": "illegal_activity", "illegalregulatedactivities": "illegal_activity",
    "substanceabuse": "ILL-01", "scams": "ILL-03", "hatespeech": "HAT-01", "hatefulcontent": "HAT-01",
    "discrimination": "HAT-01", "bullying": "HAT-02", "harassmentbullying": "HAT-02", "sexual": "sexual_content",
    "pornography": "SEX-01", "adultcontent": "SEX-01", "childsexualexploitation": "SEX-02",
    "privacyviolation": "privacy", "falsedeceptiveinformation": "misinformation",
    "deceptiveinformation": "misinformation", "deepfake": "MIS-01", "elections": "MIS-02", "hacking": "CYB-01",
    "malware": "CYB-01", "terrorism": "EXT-01", "violentextremism": "EXT-01", "animalabuse": "ANI-01",
}
STYLE_MAP = {"explicit": "explicit", "direct": "explicit", "videogrounded": "video_grounded",
             "implicit": "video_grounded", "videodependent": "video_grounded", "jailbreak": "jailbreak",
             "roleplay": "jailbreak", "hypothetical": "jailbreak", "benignsensitive": "benign_sensitive",
             "benign": "benign_sensitive", "borderline": "benign_sensitive"}
QUERY_TYPE_MAP = {"harmful": "harmful", "unsafe": "harmful", "malicious": "harmful", "true": "harmful",
                  "benign": "benign", "safe": "benign", "harmless": "benign", "false": "benign"}
VIDEO_TOKENS = re.compile(r"<\|?(?:video|image|vision)[a-z0-9_]*\|?>", re.I)
USER, ASSISTANT = ("user", "human"), ("assistant", "gpt", "model")


def letters(s):
    return re.sub(r"[^a-z0-9]", "", str(s).lower())


def iter_records(path):
    """(location, record) per record; None for an unparseable JSONL line (counted, skipped)."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it to JSONL")
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                n += 1
                yield f"{path}#{n}", rec
        return
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield f"{path}:{i + 1}", json.loads(line)
                    except ValueError:
                        yield f"{path}:{i + 1}", None
            return
        data = json.load(f)
    if isinstance(data, dict):  # a {"data": [...]}-style wrapper; any other object (dataset_infos.json) is skipped
        data = next((data[k] for k in ("data", "train", "items", "records", "pairs") if isinstance(data.get(k), list)),
                    [])
    for i, rec in enumerate(data if isinstance(data, list) else []):
        yield f"{path}[{i}]", rec


def find_files(src_path):
    if os.path.isfile(src_path):
        return [src_path]
    found = []
    for folder, dirs, files in os.walk(src_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith((".jsonl", ".json", ".parquet"))]
    return found


def flatten(rec, prefix=""):
    """{dotted key: value} over nested dicts; a dict is kept as a value too (a {"from", "value"} response)."""
    flat = {}
    for k, v in rec.items():
        flat[prefix + str(k)] = v
        if isinstance(v, dict):
            flat.update(flatten(v, prefix + str(k) + "."))
    return flat


@functools.lru_cache(maxsize=256)
def roles(keys):
    """role -> column among `keys` (a record's flattened keys): the shallowest match, then the preferred name."""
    cols = {}
    for role, names in COLUMNS.items():
        hits = [(k.count("."), names.index(k.rsplit(".", 1)[-1].lower()), k) for k in keys
                if k.rsplit(".", 1)[-1].lower() in names]
        if hits:
            cols[role] = min(hits)[2]
    return cols


def check_layout(path, rec):
    """A file's first record must have every required role; else an error naming what was found and accepted."""
    keys = tuple(sorted(flatten(rec)))
    missing = [r for r in REQUIRED if r not in roles(keys)]
    if missing:
        accepted = "; ".join(f"{r}: {', '.join(COLUMNS[r])}" for r in REQUIRED)
        raise ValueError(f"{path}: unknown layout, no column for {missing}. Columns found: {list(keys)}. Accepted: "
                         f"{accepted}. Rename the columns, or add the names to COLUMNS in {__file__}")


def text_of(value, speakers=USER):
    """The text in a string, a message dict, a list of content parts or a chat (last turn of `speakers`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for k in ("value", "content", "text"):
            if k in value:
                return text_of(value[k], speakers)
        return None
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        turns = [m for m in value if str(m.get("role", m.get("from", ""))).lower() in speakers]
        if turns:
            return text_of(turns[-1], speakers)
        parts = [p.get("text") for p in value if p.get("type") == "text" and isinstance(p.get("text"), str)]
        return "\n".join(parts) if parts else None
    return None


def video_of(value):
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("path") or value.get("video") or value.get("url")
    if not isinstance(value, (str, int)) or not str(value).strip():
        return None
    return posixpath.normpath(str(value).strip().replace("\\", "/"))  # as describe.py lists videos: posix, normalized


def category_lookup(tax):
    """letters(name) -> (category, subcategory, rule): our rule/subcategory/category ids, then CATEGORY_MAP."""
    rules, table = tax["rules"], {}
    for rid, r in rules.items():
        table[letters(rid)] = table[letters(r["subcategory"])] = (r["category"], r["subcategory"], rid)
    for cat in {r["category"] for r in rules.values()}:
        only = [rid for rid, r in rules.items() if r["category"] == cat]
        table[letters(cat)] = (cat, "", only[0] if len(only) == 1 else "")
    for name, target in CATEGORY_MAP.items():
        table[name] = table[letters(target)]
    return table


def convert_record(rec, table, video_id):
    """-> (pair, None | "unmapped") or (None, reason). Columns are found per record: optional ones may be sparse."""
    flat = flatten(rec)
    cols = roles(tuple(sorted(flat)))
    if any(r not in cols for r in REQUIRED):
        return None, "missing_" + next(r for r in REQUIRED if r not in cols)
    video = video_of(flat.get(cols["video"]))
    prompt = text_of(flat.get(cols["prompt"]), USER)
    prompt = " ".join(VIDEO_TOKENS.sub(" ", prompt).split()) if prompt else ""
    chosen, rejected = (text_of(flat.get(cols[r]), ASSISTANT) for r in ("chosen", "rejected"))
    for role, value in (("video", video), ("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not value or not value.strip():
            return None, f"missing_{role}"
    if chosen.strip() == rejected.strip():
        return None, "chosen_equals_rejected"
    get = {r: flat.get(c) for r, c in cols.items()}
    vid = str(get["video_id"]) if get.get("video_id") not in (None, "") else video_id(video)
    src_cat, src_sub = str(get.get("category") or ""), str(get.get("subcategory") or "")
    given = str(get.get("rule") or "")
    ours = table.get(letters(given)) if given else None
    hit = (ours if ours and ours[2] == given else None) or table.get(letters(src_sub)) or table.get(letters(src_cat))
    category, subcategory, rule = hit if hit else (src_cat or "unknown", src_sub, "")
    if hit and not hit[1] and src_sub:
        subcategory = src_sub  # only the category mapped: keep the source subcategory
    style = STYLE_MAP.get(letters(get.get("style") or ""))
    qtype = QUERY_TYPE_MAP.get(str(get.get("query_type")).lower()) or ("benign" if style == "benign_sensitive"
                                                                         else "harmful")
    style = style or ("benign_sensitive" if qtype == "benign" else "unknown")
    pair = dict(id=pair_id(vid, prompt), video=video, prompt=prompt, chosen=chosen.strip(),
                rejected=rejected.strip(), category=category, subcategory=subcategory, rule=rule, style=style,
                query_type=qtype, video_id=vid, source="safevid-350k", source_category=src_cat)
    if get.get("source_id") is not None:
        pair["source_id"] = str(get["source_id"])
    return pair, None if hit else "unmapped"


def convert(src_path, out_path, taxonomy_path, video_id=records.video_id):
    """SafeVid-350K files -> appended pairs JSONL (resumable, deduplicated by id) -> summary dict."""
    table = category_lookup(load_taxonomy(taxonomy_path))
    files = [p for p in find_files(src_path) if os.path.abspath(p) != os.path.abspath(out_path)]  # out inside src
    if not files:
        raise FileNotFoundError(f"no .jsonl/.json/.parquet files under src {src_path!r}: point --src at your "
                                "SafeVid-350K download")
    done, seen = {p["id"] for p in records.iter_records(out_path, required=("id",))}, set()
    s = dict(written=0, already_done=0, duplicate=0, malformed=Counter(), first_bad={}, unmapped=Counter(),
             category=Counter(), style=Counter(), query_type=Counter(), files=0)
    with Writer(out_path, existing_ids=done) as f:  # per pair: a kill loses at most a torn last line
        for path in files:
            checked = False
            for loc, rec in iter_records(path):
                if isinstance(rec, dict) and not checked:
                    check_layout(path, rec)
                    checked = True
                pair, reason = (convert_record(rec, table, video_id) if isinstance(rec, dict) else
                                (None, "bad_json" if rec is None else "not_an_object"))
                if pair is None:
                    s["malformed"][reason] += 1
                    s["first_bad"].setdefault(reason, loc)
                    continue
                if pair["id"] in seen:  # the same video and query twice in the input
                    s["duplicate"] += 1
                    continue
                seen.add(pair["id"])  # counted whether written now or by an earlier run: the summary is the output's
                s["unmapped"].update([pair["source_category"] or "(none)"] if reason == "unmapped" else [])
                for k in ("category", "style", "query_type"):
                    s[k][pair[k]] += 1
                if pair["id"] in done:
                    s["already_done"] += 1
                    continue
                f.write(pair)
                s["written"] += 1
            s["files"] += checked
    return s


def to_trl(pair, fmt="conversational"):
    """One of our pairs -> a TRL preference record with a `video` column (and `videos` when conversational)."""
    extra = {k: pair[k] for k in ("id", "category", "subcategory", "rule", "style", "query_type") if k in pair}
    if pair.get("video_id", pair.get("description_id")):
        extra["video_id"] = pair.get("video_id", pair.get("description_id"))
    if fmt == "standard":
        return dict(prompt=pair["prompt"], chosen=pair["chosen"], rejected=pair["rejected"], video=pair["video"],
                    **extra)
    if fmt != "conversational":
        raise ValueError(f"trl_format {fmt!r} must be 'conversational' or 'standard'")
    answer = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    return dict(prompt=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": pair["prompt"]}]}],
                chosen=answer(pair["chosen"]), rejected=answer(pair["rejected"]), video=pair["video"],
                videos=[pair["video"]], **extra)


def export_trl(pairs_path, out_path, fmt="conversational"):
    """Our pairs JSONL -> TRL JSONL, one record per pair id, written whole then renamed (a rerun is identical)."""
    seen, out = set(), []
    for pair in records.iter_records(pairs_path, required=("id", "video", "prompt", "chosen", "rejected")):
        if pair["id"] not in seen:
            seen.add(pair["id"])
            out.append(to_trl(pair, fmt))
    records.write_records(out_path, out)
    return len(out)


def print_summary(s, out_path):
    print(f"{s['written']} pairs written to {out_path} ({s['already_done']} already there, {s['duplicate']} "
          f"duplicates in the input) from {s['files']} files")
    for key in ("category", "style", "query_type"):
        print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in s[key].most_common()))
    for reason, n in s["malformed"].most_common():
        print(f"  skipped {n} malformed ({reason}), first at {s['first_bad'][reason]}")
    if s["unmapped"]:
        print(f"  warning: {sum(s['unmapped'].values())} pairs with categories not in the taxonomy, kept verbatim "
              "with rule '': " + ", ".join(f"{k!r} {v}" for k, v in s["unmapped"].most_common(20)))


def run(config):
    if config["mode"] not in ("import", "trl") or config["trl_format"] not in ("conversational", "standard"):
        raise ValueError(f"mode {config['mode']!r} must be import or trl, trl_format {config['trl_format']!r} "
                         "conversational or standard")
    if not config["src"] or not os.path.exists(config["src"]):
        raise FileNotFoundError(f"src {config['src']!r} not found: point --src at the input (see the docstring)")
    if config["mode"] == "trl":
        n = export_trl(config["src"], config["out"], config["trl_format"])
        print(f"{n} TRL records -> {config['out']}")
        return dict(status="done", records=n)
    s = convert(config["src"], config["out"], config["taxonomy"])
    print_summary(s, config["out"])
    return dict(s, status="done")  # malformed records are skipped with their reason: permanent, so done


if __name__ == "__main__":
    defaults = {k: v for k, v in dict(globals()).items() if k in ("mode", "src", "out", "taxonomy", "trl_format")}
    sys.exit(main("safevid350k/prepare.py", defaults, run, sys.argv[1:],
                  lambda c: (c["out"] + ".config.json", c["out"] + ".summary.json")))
