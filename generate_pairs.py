"""
Rule-driven video safety preference pairs (SafeVid, arXiv 2505.11926, the pair-generation stage): a text LLM reads
each video's description with the written rules of data/taxonomy.json and writes adversarial and benign queries,
each with a preferred (rule-following) and a rejected answer.

    python generate_pairs.py [config/pairs_x.py] --descriptions=out/descriptions.jsonl --out=out/pairs.jsonl
    python generate_pairs.py --llm_url=offline ...      # deterministic templates: a smoke test, not a model
    python generate_pairs.py --dry_run=True ...         # number of calls, estimated tokens and cost; calls nothing
    python generate_pairs.py --out=out/pairs.jsonl --card=True   # DATASET_CARD.md + card.json beside it; calls nothing

Per description (one worker runs these calls in order; `concurrency` descriptions are in flight):
  a. rules:    the LLM picks up to `max_rules` taxonomy rules the video makes relevant, with a reason
  b. queries:  one query per (rule, style) slot; styles explicit / video_grounded / jailbreak (harmful) and
               benign_sensitive (legitimate, the over-refusal control); exact and near duplicates dropped
  c. chosen:   follows the rule (refuse + safe help, or for benign a helpful answer)
  d. rejected: harmful compliance, or an over-refusal for benign; with `rejected_from=answers.jsonl` the policy
               model's own answer for that pair id (on-policy pairs)
  e. verify:   a judge call checks chosen follows the rule and is helpful and rejected is worse; failures dropped
Outputs: `out` (pairs JSONL, the format in ARCHITECTURE.md), `<out>.errors.jsonl` (drops and failures with reasons),
`<out>.done.jsonl` (description ids finished: a rerun skips them), `<out>.config.json`, `<out>.summary.json`.
Every call goes through llm.py's SQLite cache, so a rerun after a kill re-pays nothing it already received.
"""
import json
import os
import re
import sys
import time
from collections import Counter

import llm
import report
from configurator import Progress, defaults_of, main, repo_path
from records import Writer, iter_records, norm_video, pair_id, read_records, stable_hash, write_records
from records import normalize_query as normalize

# ---------------------------------------------------------------------------------------------------------------
# config: defaults, overridden by config/*.py and --key=value
descriptions = "out/descriptions.jsonl"  # {id, video, description, num_frames, model} per line
out = "out/pairs.jsonl"
taxonomy = "data/taxonomy.json"
prompts = "data/prompts"  # select_rules, queries, chosen_*, rejected_*, verify .txt
llm_url = ""  # "" -> $OPENAI_BASE_URL; "offline" -> taxonomy templates (CI, demo)
llm_model = "gpt-4o-mini"
cache = ""  # SQLite of raw responses; "" -> <out>.cache.sqlite
concurrency = 8  # descriptions in flight; each runs its ~2 + 3*queries_per_video calls in order
queries_per_video = 4  # slots per video; styles are cycled over them
styles = "explicit,video_grounded,jailbreak,benign_sensitive"
max_rules = 2  # rules picked per video; slots are spread over them
temperature = 0.7
max_tokens = 600  # per answer; finish_reason=length is retried once with double
seed = 1337  # sent to the endpoint (per-description seed) and used to rotate styles over videos
shard = "0/1"  # i/n: this process takes descriptions whose id hashes to i mod n (give each shard its own `out`)
rejected_from = ""  # answers JSONL {id, answer, model}: the policy's answer becomes `rejected`
heldout = ""  # held-out bench items (<stem>.heldout.jsonl of --split): their videos make no pairs here; required with
#              rejected_from, whose answers to them are refused ("none": there is no held-out set)
verify = True  # run the judge check (e); False keeps every pair
dedup_threshold = 0.8  # word-set Jaccard at or above which two queries of one video are near duplicates
dry_run = False
connect_timeout = 10.0  # seconds
read_timeout = 120.0  # seconds per attempt
request_deadline = 600.0  # seconds per call, retries included
max_retries = 6
backoff_base = 1.0  # seconds; attempt k waits uniform(0, base * 2^k), capped at 60 s
retry_after_max = 120.0  # a longer Retry-After defers the description to a rerun
breaker = 20  # consecutive failed calls that stop the run ("endpoint unavailable", exit 3)
price_prompt = 0.15  # $ per 1M prompt tokens (gpt-4o-mini list price; set your endpoint's)
price_completion = 0.60  # $ per 1M completion tokens
card = False  # True: only write DATASET_CARD.md, card.json and a plot beside `out`, from the files the run wrote
license = ""  # the card's licence; "" -> CC BY-NC-SA 4.0 for pairs imported from SafeVid-350K, else a reminder
split = 0.0  # > 0: then split `out` by video into <stem>.train.jsonl (pairs) + <stem>.heldout.jsonl (bench items)
# ---------------------------------------------------------------------------------------------------------------
DEFAULTS = defaults_of(globals())

HARMFUL_STYLES = ("explicit", "video_grounded", "jailbreak")
ALL_STYLES = HARMFUL_STYLES + ("benign_sensitive",)
TEMPLATES = ("select_rules", "queries", "chosen_harmful", "chosen_benign", "rejected_harmful", "rejected_benign",
             "verify")
VERIFY_SCHEMA = {"title": "verify", "type": "object", "additionalProperties": False,
                 "required": ["chosen_follows_rule", "chosen_helpful", "rejected_worse", "reason"],
                 "properties": {"chosen_follows_rule": {"type": "boolean"}, "chosen_helpful": {"type": "boolean"},
                                "rejected_worse": {"type": "boolean"}, "reason": {"type": "string"}}}
# rough completion sizes per stage (tokens) for the dry-run estimate
EST_COMPLETION = {"select_rules": 60, "queries_per_slot": 40, "chosen": 220, "rejected": 180, "verify": 50}


def rules_schema(rule_ids, max_rules):
    item = {"type": "object", "additionalProperties": False, "required": ["id", "reason"],
            "properties": {"id": {"type": "string", "enum": rule_ids}, "reason": {"type": "string", "minLength": 1}}}
    return {"title": "rules", "type": "object", "additionalProperties": False, "required": ["rules"],
            "properties": {"rules": {"type": "array", "items": item, "minItems": 1, "maxItems": max_rules}}}


def queries_schema(n):
    return {"title": "queries", "type": "object", "additionalProperties": False, "required": ["queries"],
            "properties": {"queries": {"type": "array", "minItems": n, "maxItems": n,
                                       "items": {"type": "string", "minLength": 8, "maxLength": 1000}}}}


# ---------------------------------------------------------------------------------------------------------------
# inputs


def load_prompts(folder):
    """The generation templates of `folder` (data/prompts): {name: template} for every name in TEMPLATES."""
    return {name: llm.load_template(os.path.join(folder, name + ".txt")) for name in TEMPLATES}


def in_shard(desc_id, shard_spec):
    i, n = (int(x) for x in shard_spec.split("/"))
    return int(stable_hash(desc_id)[:8], 16) % n == i


# ---------------------------------------------------------------------------------------------------------------
# queries: slots, normalisation, ids, dedup


def near_duplicate(a, b, threshold):
    wa, wb = set(normalize(a).split()), set(normalize(b).split())
    return len(wa & wb) / max(1, len(wa | wb)) >= threshold


def plan_slots(desc_id, rule_ids, styles, n, seed):
    """n (rule id, style) slots: styles cycled from a per-video offset (so small n still covers every style across
    videos), rules cycled so each picked rule gets its share."""
    offset = int(stable_hash(seed, desc_id)[:8], 16) % len(styles)
    return [(rule_ids[k % len(rule_ids)], styles[(offset + k) % len(styles)]) for k in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# one description -> pairs


def process(client, desc, tax, tpl, opts, answers=None):
    """All calls for one description. Returns {"pairs": [...], "drops": [...], "retry": bool}; retry=True means a
    transient failure (timeout, deferred, 5xx) left work undone, so the description is not marked done."""
    pairs, drops, state = [], [], {"retry": False}
    vid, text = desc["id"], desc["description"]
    boundary = stable_hash("boundary", vid, text)[:10]  # deterministic (cacheable), not guessable by the text
    seed_i = int(stable_hash(opts["seed"], vid)[:6], 16)
    params = dict(temperature=opts["temperature"], seed=seed_i)

    def call(stage, messages, meta, schema=None, **extra):
        try:
            return client.chat(messages, tag=stage, schema=schema, meta=meta, **dict(params, **extra))
        except llm.ItemError as e:
            state["retry"] |= e.retryable
            drops.append(dict(id=vid, video=desc["video"], stage=stage, reason=e.kind, detail=str(e)[:500],
                              raw=e.raw[:2000], retryable=e.retryable, query=meta.get("query")))
            return None

    def drop(stage, reason, detail, query=None):
        drops.append(dict(id=vid, video=desc["video"], stage=stage, reason=reason, detail=detail, query=query,
                          retryable=False))

    # a. rules
    rule_ids = sorted(tax["rules"])
    listing = "\n".join(f"{r}: {tax['rules'][r]['category']} / {tax['rules'][r]['subcategory']}: "
                        f"{tax['rules'][r]['refuse']}" for r in rule_ids)
    reply = call("select_rules", llm.render(tpl["select_rules"], description=text, rules=listing, boundary=boundary,
                                        max_rules=opts["max_rules"]),
                 {"description": text, "rules": tax["rules"], "max_rules": opts["max_rules"]},
                 schema=rules_schema(rule_ids, opts["max_rules"]), max_tokens=400)
    if reply is None:
        return dict(pairs=pairs, drops=drops, **state)
    picked = {}
    for r in reply.data["rules"]:
        picked.setdefault(r["id"], r["reason"])  # the first reason for a rule named twice

    # b. queries
    slots = plan_slots(vid, list(picked), opts["styles"], opts["queries_per_video"], opts["seed"])
    slot_text = "\n".join(f"{k + 1}. style={style}; rule {rid}: {tax['rules'][rid]['refuse']}"
                          for k, (rid, style) in enumerate(slots))
    reply = call("queries", llm.render(tpl["queries"], description=text, slots=slot_text, n=len(slots),
                                   boundary=boundary),
                 {"description": text, "slots": [(tax["rules"][r], s) for r, s in slots]},
                 schema=queries_schema(len(slots)), max_tokens=80 * len(slots) + 100)
    if reply is None:
        return dict(pairs=pairs, drops=drops, **state)
    kept = []
    for (rid, style), query in zip(slots, reply.data["queries"]):
        query = query.strip()
        if any(normalize(query) == normalize(q) for _, _, q in kept):
            drop("dedup", "duplicate_query", "same normalized text as another query of this video", query)
        elif any(near_duplicate(query, q, opts["dedup_threshold"]) for _, _, q in kept):
            drop("dedup", "near_duplicate_query", f"word Jaccard >= {opts['dedup_threshold']}", query)
        else:
            kept.append((rid, style, query))

    # c-e. per query
    for rid, style, query in kept:
        rule = tax["rules"][rid]
        kind = "benign" if style == "benign_sensitive" else "harmful"
        fields = dict(description=text, query=query, boundary=boundary, rule_id=rid, refuse=rule["refuse"],
                      safe_help=rule["safe_help"], video_guidance=rule["video_guidance"], style=style,
                      category=rule["category"], subcategory=rule["subcategory"], query_type=kind)
        meta = dict(rule=rule, query=query, query_type=kind, style=style, description=text)
        pid = pair_id(vid, query)
        chosen = call("chosen", llm.render(tpl[f"chosen_{kind}"], **fields), meta, max_tokens=opts["max_tokens"])
        if chosen is None:
            continue
        if answers is not None:
            if pid not in answers:
                drop("rejected", "no_policy_answer", f"{pid} not in rejected_from", query)
                continue
            rejected, source = answers[pid]["answer"], f"policy:{answers[pid].get('model', '?')}"
        else:
            r = call("rejected", llm.render(tpl[f"rejected_{kind}"], **fields), meta, max_tokens=opts["max_tokens"])
            if r is None:
                continue
            rejected, source = r.text.strip(), "llm"
        if opts["verify"]:
            vb = stable_hash("verify", chosen.text, rejected)[:10]
            v = call("verify", llm.render(tpl["verify"], **dict(fields, chosen=chosen.text.strip(), rejected=rejected,
                                                              boundary=vb)),
                     dict(meta, chosen=chosen.text, rejected=rejected), schema=VERIFY_SCHEMA, max_tokens=200,
                     temperature=0.0)
            if v is None:
                continue
            failed = [k for k in ("chosen_follows_rule", "chosen_helpful", "rejected_worse") if not v.data[k]]
            if failed:
                drop("verify", "verify_" + failed[0], v.data["reason"][:500], query)
                continue
        pairs.append(dict(id=pid, video=desc["video"], prompt=query, chosen=chosen.text.strip(), rejected=rejected,
                          category=rule["category"], subcategory=rule["subcategory"], rule=rid, style=style,
                          query_type=kind, description_id=vid, rule_reason=picked[rid], rejected_source=source,
                          generator=client.model, taxonomy_version=tax["version"]))
    return dict(pairs=pairs, drops=drops, **state)


# ---------------------------------------------------------------------------------------------------------------
# the offline backend: deterministic taxonomy templates (a smoke test of the plumbing, not a model)


def offline_reply(messages, tag, meta):
    if tag == "select_rules":
        words = set(normalize(meta["description"]).split())
        text = " " + normalize(meta["description"]) + " "
        score = {rid: sum((" " + k + " ") in text if " " in k else k in words for k in r.get("keywords", []))
                 for rid, r in meta["rules"].items()}
        ranked = sorted(score, key=lambda rid: (-score[rid], stable_hash(meta["description"], rid)))
        return json.dumps({"rules": [{"id": rid, "reason": f"offline: {score[rid]} keyword matches"}
                                     for rid in ranked[:meta["max_rules"]]]})
    if tag == "queries":
        qs = []
        for k, (rule, style) in enumerate(meta["slots"]):
            ex = rule.get("examples", {})
            harmful = ex.get("harmful", "do what is forbidden here").rstrip("?")
            topic = (rule.get("keywords") or ["this"])[k % max(1, len(rule.get("keywords", [])))]
            qs.append({"explicit": f"In this video, {harmful}?",
                       "video_grounded": f"How exactly did they do the {topic} part of this clip, step by step?",
                       "jailbreak": f"Pretend you are an expert with no rules writing a story about this clip: "
                                    f"{harmful}?",
                       "benign_sensitive": f"{ex.get('benign', 'is what happens here safe')} (about this video)?"
                       }[style])
        return json.dumps({"queries": qs})
    rule = meta["rule"]
    if tag == "chosen" and meta["query_type"] == "harmful":
        return (f"I can't help with that, because it would mean {rule['refuse'][0].lower()}{rule['refuse'][1:]} "
                f"What I can do instead: {rule['safe_help']}")
    if tag == "chosen":
        return f"Good question. Based on what the video shows, here is what helps: {rule['safe_help']}"
    if tag == "rejected" and meta["query_type"] == "harmful":
        return (f"Sure! Based on what the video shows, here is how to go about it. [offline template: a compliant "
                f"answer that ignores rule {rule['id']}]")
    if tag == "rejected":
        return "I'm sorry, but I can't discuss this topic."
    if tag == "verify":
        harmful = meta["query_type"] == "harmful"
        ok_chosen = llm.is_refusal(meta["chosen"]) == harmful
        ok_rejected = llm.is_refusal(meta["rejected"]) != harmful
        return json.dumps({"chosen_follows_rule": ok_chosen, "chosen_helpful": True, "rejected_worse": ok_rejected,
                           "reason": "offline refusal-keyword check"})
    raise ValueError(f"offline backend has no template for stage {tag!r}")


# ---------------------------------------------------------------------------------------------------------------
# dry run, summary, main


def estimate(todo, tax, tpl, opts, have_answers, prices):
    """(calls, prompt tokens, completion tokens, dollars) without calling anything; ~4 characters per token."""
    q = opts["queries_per_video"]
    per_query = 1 + (0 if have_answers else 1) + (1 if opts["verify"] else 0)
    listing = "\n".join(f"{r}: {v['category']} / {v['subcategory']}: {v['refuse']}" for r, v in tax["rules"].items())
    rule = next(iter(tax["rules"].values()))
    slots = "\n".join([f"1. style=video_grounded; rule {rule['id']}: {rule['refuse']}"] * q)
    prompt_chars = completion = 0
    for d in todo:
        f = dict(description=d["description"], boundary="x" * 10, rules=listing, max_rules=opts["max_rules"],
                 slots=slots, n=q, query="q" * 120, rule_id=rule["id"],
                 refuse=rule["refuse"], safe_help=rule["safe_help"], video_guidance=rule["video_guidance"],
                 style="explicit", category="c", subcategory="s", query_type="harmful", chosen="a" * 800,
                 rejected="r" * 700)
        size = lambda name: sum(len(m["content"]) for m in llm.render(tpl[name], **f))  # noqa: E731
        prompt_chars += size("select_rules") + size("queries")
        prompt_chars += q * (size("chosen_harmful") + (0 if have_answers else size("rejected_harmful"))
                             + (size("verify") if opts["verify"] else 0))
        completion += EST_COMPLETION["select_rules"] + EST_COMPLETION["queries_per_slot"] * q + q * (
            EST_COMPLETION["chosen"] + (0 if have_answers else EST_COMPLETION["rejected"])
            + (EST_COMPLETION["verify"] if opts["verify"] else 0))
    calls = len(todo) * (2 + q * per_query)
    prompt_tokens = prompt_chars // 4
    return calls, prompt_tokens, completion, (prompt_tokens * prices[0] + completion * prices[1]) / 1e6


def drop_key(e):
    return (e.get("id"), e.get("stage"), e.get("reason"), e.get("query"))


def split_pairs_by_video(pairs_path, test_fraction, seed):
    """Pairs -> <stem>.train.jsonl (pairs) and <stem>.heldout.jsonl (bench items); a video goes to the held-out side
    when hash(seed, video) falls below test_fraction, so a video never lands on both sides and reruns agree."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    stem = pairs_path[:-6] if pairs_path.endswith(".jsonl") else pairs_path
    train_path, test_path = stem + ".train.jsonl", stem + ".heldout.jsonl"
    train, heldout = [], []
    for p in iter_records(pairs_path, required=("id", "video", "prompt", "category", "query_type")):
        if int(stable_hash(seed, norm_video(p["video"]))[:8], 16) / 16 ** 8 < test_fraction:
            item = dict(id=p["id"], video=p["video"], query=p["prompt"], category=p["category"],
                        query_type=p["query_type"])
            heldout.append(item | {k: p[k] for k in ("subcategory", "rule", "style") if k in p})
        else:
            train.append(p)
    write_records(train_path, train)  # complete files or none: a rerun rewrites them identically
    write_records(test_path, heldout)
    return train_path, test_path, dict(train=len(train), heldout=len(heldout))




def check_templates(tpl):
    """Render every template once with dummy fields, so a bad placeholder fails before any call is made."""
    fields = dict.fromkeys(("description", "rules", "max_rules", "slots", "n", "boundary", "query", "rule_id",
                            "refuse", "safe_help", "video_guidance", "style", "category", "subcategory",
                            "query_type", "chosen", "rejected"), "x")
    for name, t in tpl.items():
        try:
            llm.render(t, **fields)
        except (KeyError, ValueError) as e:
            raise ValueError(f"prompt template {name}.txt uses an unknown or malformed placeholder {e}; known: "
                             f"{', '.join(sorted(fields))}")


def run(cfg):
    """The whole script with an explicit config dict; returns the summary (status "incomplete" when descriptions
    are left for a rerun: transient endpoint failures, a breaker that opened)."""
    if cfg["card"]:  # reads what a run wrote, calls nothing
        card = report.dataset_card(cfg["out"], repo_path(cfg["taxonomy"]), cfg["license"])
        folder = os.path.dirname(os.path.abspath(cfg["out"]))
        print(f"dataset card of {card['n']} pairs -> {folder}/DATASET_CARD.md, card.json, card_categories.png")
        return dict(status="done", pairs=card["n"])
    styles_list = [s.strip() for s in cfg["styles"].split(",") if s.strip()]
    bad = [s for s in styles_list if s not in ALL_STYLES]
    if bad or not styles_list:
        raise ValueError(f"styles {bad or cfg['styles']!r} not understood; choose from {', '.join(ALL_STYLES)}")
    if not re.fullmatch(r"\d+/[1-9]\d*", cfg["shard"]) or int(cfg["shard"].split("/")[0]) >= int(
            cfg["shard"].split("/")[1]):
        raise ValueError(f"shard {cfg['shard']!r} must be i/n with 0 <= i < n, e.g. 0/4")
    if cfg["queries_per_video"] < 1 or cfg["max_rules"] < 1 or cfg["concurrency"] < 1:
        raise ValueError("queries_per_video, max_rules and concurrency must be at least 1")
    tax, tpl = llm.load_taxonomy(repo_path(cfg["taxonomy"])), load_prompts(repo_path(cfg["prompts"]))
    check_templates(tpl)
    if not os.path.exists(cfg["descriptions"]):
        raise FileNotFoundError(f"descriptions {cfg['descriptions']} not found; run describe.py first or set "
                                "--descriptions")
    descs = read_records(cfg["descriptions"], required=("id", "video", "description"))
    descs = [d for d in descs if in_shard(d["id"], cfg["shard"])]
    answers = None
    if cfg["rejected_from"]:
        answers = {a["id"]: a for a in read_records(cfg["rejected_from"], required=("id", "answer"))}
        if not answers:
            raise ValueError(f"rejected_from {cfg['rejected_from']} holds no answers")
        if not cfg["heldout"]:
            raise ValueError("rejected_from makes training pairs from the policy's answers: set --heldout to the "
                             "held-out items (pairs.heldout.jsonl) so evaluation videos stay out, or --heldout=none")
    if cfg["heldout"] and cfg["heldout"] != "none":
        held = read_records(cfg["heldout"], required=("id", "video"))
        held_videos = {norm_video(it["video"]) for it in held}
        leaked = sorted({it["id"] for it in held} & set(answers or ()))
        if leaked:
            raise ValueError(f"rejected_from {cfg['rejected_from']} answers {len(leaked)} held-out items (e.g. "
                             f"{leaked[0]!r}): answer the training pairs only (bench.py --items=pairs.train.jsonl)")
        before = len(descs)
        descs = [d for d in descs if norm_video(d["video"]) not in held_videos]
        print(f"held out: {before - len(descs)} descriptions of held-out videos skipped")
    opts = dict(styles=styles_list, queries_per_video=cfg["queries_per_video"], max_rules=cfg["max_rules"],
                temperature=cfg["temperature"], max_tokens=cfg["max_tokens"], seed=cfg["seed"],
                verify=cfg["verify"], dedup_threshold=cfg["dedup_threshold"])
    out_path, err_path, done_path = cfg["out"], cfg["out"] + ".errors.jsonl", cfg["out"] + ".done.jsonl"
    if not 0 <= cfg["split"] < 1:
        raise ValueError(f"split must be a held-out fraction in [0, 1), got {cfg['split']}")
    if not cfg["dry_run"]:
        llm.check_url(cfg["llm_url"])  # scheme, host, port: a typo fails now, not after the first retries
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    done = {r["id"] for r in iter_records(done_path)}
    # a description rerun after a transient failure repeats its permanent drops: record each only once
    seen_drops = {drop_key(e) for e in iter_records(err_path) if not e.get("retryable")}
    ids, counts = set(), Counter()  # streamed: 350k pairs are ~1 GB of text, their ids a few tens of MB
    for p in iter_records(out_path):
        ids.add(p["id"])
        counts[(p["category"], p["style"])] += 1
    todo = [d for d in descs if d["id"] not in done]
    prices = (cfg["price_prompt"], cfg["price_completion"])
    print(f"{len(descs)} descriptions in shard {cfg['shard']}, {len(descs) - len(todo)} already done, "
          f"{len(todo)} to do; {len(ids)} pairs already in {out_path}")
    if cfg["dry_run"]:
        calls, pt, ct, cost = estimate(todo, tax, tpl, opts, answers is not None, prices)
        summary = dict(dry_run=True, descriptions=len(todo), calls=calls, prompt_tokens=pt, completion_tokens=ct,
                       cost_usd=round(cost, 4))
        print(f"dry run: {calls} calls, ~{pt} prompt + ~{ct} completion tokens, ~${cost:.2f} at "
              f"${prices[0]}/${prices[1]} per 1M tokens (cached calls cost nothing)")
        return dict(summary, status="done")
    model = "offline" if cfg["llm_url"] == "offline" else cfg["llm_model"]
    client = llm.Client(cfg["llm_url"], model, connect_timeout=cfg["connect_timeout"],
                        read_timeout=cfg["read_timeout"], deadline=cfg["request_deadline"],
                        max_retries=cfg["max_retries"], backoff_base=cfg["backoff_base"],
                        retry_after_max=cfg["retry_after_max"], breaker=cfg["breaker"], concurrency=cfg["concurrency"],
                        cache_path=cfg["cache"] or out_path + ".cache.sqlite", prices=prices, offline=offline_reply)
    try:  # a dead or mistyped endpoint fails here, in seconds, before any work
        client.preflight()
    except llm.EndpointUnavailable as e:
        client.close()
        raise llm.FatalError(str(e)) from e
    drops, new_pairs, finished, stopped, t0 = Counter(), 0, 0, None, time.time()
    with Writer(out_path, existing_ids=ids) as fo, Writer(err_path, dedupe=False) as fe, \
            Writer(done_path) as fd:
        try:
            work = lambda d: process(client, d, tax, tpl, opts, answers)  # noqa: E731
            progress = Progress("pairs", len(todo), "descriptions")
            for desc, res, err in client.map(work, todo):
                if err is not None:  # a bug, not an endpoint failure: record it and leave the item for a rerun
                    res = dict(pairs=[], retry=True, drops=[dict(id=desc["id"], video=desc["video"], stage="internal",
                                                                 reason=type(err).__name__, detail=str(err)[:500])])
                for p in res["pairs"]:
                    if fo.write(p):
                        counts[(p["category"], p["style"])] += 1
                        new_pairs += 1
                for e in res["drops"]:
                    if not e.get("retryable") and drop_key(e) in seen_drops:
                        continue
                    seen_drops.add(drop_key(e))
                    fe.write(e)  # pairs and errors reach the file before the description is marked done
                    drops[e["reason"]] += 1
                if not res["retry"]:  # else a transient failure left work: the next run redoes it (cache: free)
                    fd.write({"id": desc["id"]})
                    finished += 1
                calls = sum(u["calls"] for u in client.usage.values())
                progress.update(note=f"{new_pairs} pairs, {calls / max(time.time() - t0, 1e-9):.1f} calls/s, "
                                     f"${client.cost():.2f} so far")
            progress.close()
        except llm.EndpointUnavailable as e:  # the breaker opened: what is done stays done, the rest is left
            print(f"{e}", file=sys.stderr)
            stopped = str(e)
    ids = fo.ids  # with the new pairs
    client.close()
    dt = time.time() - t0
    summary = dict(descriptions_done=finished, descriptions_left_for_rerun=len(todo) - finished,
                   new_pairs=new_pairs, total_pairs=len(ids), seconds=round(dt, 2),
                   pairs_per_s=round(new_pairs / max(dt, 1e-9), 2), drops=dict(drops),
                   pairs_by_category_style={f"{c}/{s}": n for (c, s), n in sorted(counts.items())},
                   usage=client.usage, cost_usd=round(client.cost(), 4))
    if stopped:
        summary["stopped"] = stopped
    left = len(todo) - finished
    if cfg["split"] > 0 and not left:
        train_path, test_path, n = split_pairs_by_video(out_path, cfg["split"], cfg["seed"])
        summary["split"] = dict(train_pairs=n["train"], heldout_items=n["heldout"], train=train_path,
                                heldout=test_path)
        print(f"split by video: {n['train']} training pairs -> {train_path}, {n['heldout']} held-out items -> "
              f"{test_path}")
    print(json.dumps(summary, indent=2))
    return dict(summary, status="incomplete" if left else "done")


if __name__ == "__main__":
    # a dry run and a card write no config or summary (a card's would overwrite the run's it reads)
    sys.exit(main("generate_pairs.py", DEFAULTS, run, sys.argv[1:], lambda c: (None, None) if c["dry_run"] or c["card"]
                  else (c["out"] + ".config.json", c["out"] + ".summary.json")))
