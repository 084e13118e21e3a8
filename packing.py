"""
Preference pairs -> tensors for DPO: validation, encoding, truncation that never cuts the video, packing into rows,
and the batches of a run (frames through video.py's timed decode path, in order).

A pair is one row [prompt + video | chosen | rejected]: kernels.attention's layout [P, C, R], where the rejected
branch restarts its positions at P and never sees the chosen branch, so the video prefix is computed once per pair.
`pack_pairs(share_prefix=False)` lays out the baseline (two rows per pair) for benchmarks and tests.
"""
import json
import os

import numpy as np
import torch

from records import stable_hash

# -----------------------------------------------------------------------------
# pairs JSONL -> validated, tokenized pairs

DROP_REASONS = ("bad_json", "missing_field", "duplicate_id", "invalid_text", "empty_response", "identical_responses",
                "missing_video", "over_length")
FIELDS = ("id", "video", "prompt", "chosen", "rejected")


def truncate_responses(P, chosen, rejected, max_len):
    """Cut the responses (never the prompt/video) so P + C + R <= max_len: the longer one first, down to an even
    split of the budget. Returns (chosen, rejected, truncated) or None when not even one token each fits."""
    budget = max_len - P
    if budget < 2:
        return None
    C, R = len(chosen), len(rejected)
    if C + R <= budget:
        return chosen, rejected, False
    # a response that fits in half the budget keeps its length, the other gets the rest (both cut: half each)
    C = min(C, max(budget // 2, budget - R))
    return chosen[:C], rejected[:budget - C], True


def encode_pair(record, tok, n_video_tokens, max_len, video_root, num_frames=0):
    """One pairs record -> (item dict, None) or (None, reason). Responses end with the family's end token. The item's
    `ref_key` hashes everything its reference log-probs depend on (token ids, video path, frames), so stored values
    are reused only for the same content."""
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in FIELDS):
        return None, "missing_field"
    texts = [record["prompt"], record["chosen"], record["rejected"]]
    if any(s in t for t in texts for s in tok.special):  # "<video>" or "<|im_end|>" in data would forge control ids
        return None, "invalid_text"
    try:
        for t in texts:
            t.encode("utf-8")  # lone surrogates (valid JSON escapes, invalid text) raise here
        prompt_ids = tok.video_prompt(record["prompt"], n_video_tokens, num_frames or None)
        chosen, rejected = tok.response(record["chosen"]), tok.response(record["rejected"])
    except (UnicodeError, ValueError):
        return None, "invalid_text"
    if not record["chosen"].strip() or not record["rejected"].strip():
        return None, "empty_response"
    if record["chosen"].strip() == record["rejected"].strip():
        return None, "identical_responses"
    video = record["video"] if os.path.isabs(record["video"]) else os.path.join(video_root, record["video"])
    if not os.path.isfile(video):
        return None, "missing_video"
    cut = truncate_responses(len(prompt_ids), chosen, rejected, max_len)
    if cut is None:
        return None, "over_length"
    if cut[0] == cut[1]:
        return None, "identical_responses"  # identical after truncation: no preference left to learn
    ref_key = stable_hash(record["id"], video, num_frames, prompt_ids, cut[0], cut[1])[:16]
    return dict(id=record["id"], video=video, category=record.get("category", ""), prompt_ids=prompt_ids,
                chosen_ids=cut[0], rejected_ids=cut[1], truncated=cut[2], ref_key=ref_key), None


def validate_pairs(path, tok, n_video_tokens, max_len, video_root, strict=False, num_frames=0):
    """Read and check every pair before any training. Returns (items, report) with report = {kept, truncated,
    dropped: {reason: count}, examples: {reason: [line numbers / ids]}}; strict raises on the first bad pair."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pairs file {path!r} not found; set --pairs to generate_pairs.py's output")
    items, seen = [], set()
    dropped, examples = dict.fromkeys(DROP_REASONS, 0), {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                item, reason = encode_pair(record, tok, n_video_tokens, max_len, video_root, num_frames)
            except (json.JSONDecodeError, UnicodeError):
                item, reason = None, "bad_json"  # includes a torn last line
            if item is not None and item["id"] in seen:
                item, reason = None, "duplicate_id"
            if reason is not None:
                if strict:
                    raise ValueError(f"{path}:{lineno}: invalid pair ({reason}); fix or remove it, or run with "
                                     f"--strict=False to drop invalid pairs")
                dropped[reason] += 1
                if len(examples.setdefault(reason, [])) < 5:
                    examples[reason].append(f"line {lineno}")
                continue
            seen.add(item["id"])
            items.append(item)
    report = dict(kept=len(items), truncated=sum(i["truncated"] for i in items), dropped=dropped, examples=examples)
    return items, report


# -----------------------------------------------------------------------------
# packing: pure functions over token ids


def common_prefix(a, b):
    """Length of the longest common prefix of two id lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def row_runs(items, max_pairs, max_len):
    """Split `items` (in order) into runs that share one grouped row: consecutive pairs of the same video (the same
    file and frames), at most `max_pairs` per run and at most `max_len` tokens in the row [S | q1 c1 r1 | ...], with
    S the pairs' common prompt prefix (system + video tokens; never cut). Returns lists of indices into items."""
    runs, S, length = [], 0, 0
    for i, it in enumerate(items):
        p = it["prompt_ids"]
        need = len(p) + len(it["chosen_ids"]) + len(it["rejected_ids"])
        if runs and len(runs[-1]) < max_pairs and items[runs[-1][0]]["video"] == it["video"]:
            s = min(S, common_prefix(items[runs[-1][0]]["prompt_ids"], p))
            grown = length + (S - s) * (len(runs[-1]) - 1) + need - s  # other queries grow by S - s
            if grown <= max_len:
                runs[-1].append(i)
                S, length = s, grown
                continue
        runs.append([i])
        S, length = len(p), need
    return runs


def video_groups(items, max_pairs, max_len):
    """The training order's unit: runs of pairs of one video (row_runs over the pairs sorted by video, stable), so a
    shuffle by group keeps each video's pairs next to each other and they share a row."""
    order = sorted(range(len(items)), key=lambda i: items[i]["video"])  # stable: file order within a video
    return [[order[k] for k in run] for run in row_runs([items[i] for i in order], max_pairs, max_len)]


def pack_pairs(items, share_prefix=True, pad_id=0, max_pairs=1, max_len=10 ** 9):
    """Lay out a batch of pairs for one forward. items: dicts with prompt_ids, chosen_ids, rejected_ids (and video).
    share_prefix: consecutive pairs of one video (up to max_pairs, within max_len) share a row
        [S | q1 c1 r1 | ... | qk ck rk], S their common prompt prefix (the video, once), layout [S, q1, c1, r1, ...]
        of kernels.attention; positions: S from 0, q_i from |S|, c_i and r_i both from |S| + |q_i|. With max_pairs=1
        each pair is its own row [S | c | r] (q empty): positions 0..P+C-1 then P..P+R-1.
    else: rows 2b, 2b+1 = prompt + chosen, prompt + rejected, layout [P+C, 0, 0, 0] (the baseline).
    The logit at position t predicts token t+1, so response token k of a branch is predicted by the hidden state
    just before it in that branch; the first token of c_i and of r_i by the last token of q_i (of S when q_i is empty).
    Returns input_ids, position_ids (N, T), layout (N, 1+3K), gather (M,) flat indices into (N*T) hidden rows,
    targets (M,), segment (M,) = 2b for chosen tokens and 2b+1 for rejected tokens of pair b, row_pair (N,) the first
    pair of each row (whose video the row shows)."""
    rows = []  # (ids, positions, layout, [(hidden index, target, segment)], first pair)
    if not share_prefix:
        for b, it in enumerate(items):
            p, c, r = it["prompt_ids"], it["chosen_ids"], it["rejected_ids"]
            P = len(p)
            rows.append((p + c, list(range(P + len(c))), [P + len(c), 0, 0, 0],
                         [(P - 1 + k, c[k], 2 * b) for k in range(len(c))], b))
            rows.append((p + r, list(range(P + len(r))), [P + len(r), 0, 0, 0],
                         [(P - 1 + k, r[k], 2 * b + 1) for k in range(len(r))], b))
    for run in row_runs(items, max_pairs, max_len) if share_prefix else []:
        S = min(common_prefix(items[run[0]]["prompt_ids"], items[b]["prompt_ids"]) for b in run)
        if len(run) == 1:
            S = len(items[run[0]]["prompt_ids"])
        ids, positions, layout, picks = list(items[run[0]]["prompt_ids"][:S]), list(range(S)), [S], []
        for b in run:
            q, c, r = items[b]["prompt_ids"][S:], items[b]["chosen_ids"], items[b]["rejected_ids"]
            assert S + len(q) >= 1 and len(c) >= 1 and len(r) >= 1, "a pair needs a prompt and two responses"
            oq = len(ids)
            oc, orr, first = oq + len(q), oq + len(q) + len(c), (oq + len(q) - 1) if q else S - 1
            picks += [(first if k == 0 else oc + k - 1, c[k], 2 * b) for k in range(len(c))]
            picks += [(first if k == 0 else orr + k - 1, r[k], 2 * b + 1) for k in range(len(r))]
            start = S + len(q)  # c and r both continue the query's positions
            ids += q + c + r
            positions += list(range(S, start)) + list(range(start, start + len(c))) + list(range(start, start + len(r)))
            layout += [len(q), len(c), len(r)]
        rows.append((ids, positions, layout, picks, run[0]))
    N, T = len(rows), max(len(ids) for ids, *_ in rows)
    width = max(len(lay) for _, _, lay, _, _ in rows)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros(N, T, dtype=torch.long)
    layout = torch.zeros(N, width, dtype=torch.long)  # zero-length trailing branches pad rows to one K
    gather, targets, segment = [], [], []
    for n, (ids, positions, lay, picks, _) in enumerate(rows):
        input_ids[n, :len(ids)] = torch.tensor(ids)
        position_ids[n, :len(ids)] = torch.tensor(positions)
        layout[n, :len(lay)] = torch.tensor(lay)
        for index, target, seg in picks:
            gather.append(n * T + index)
            targets.append(target)
            segment.append(seg)
    return dict(input_ids=input_ids, position_ids=position_ids, layout=layout, gather=torch.tensor(gather),
                targets=torch.tensor(targets), segment=torch.tensor(segment),
                row_pair=[first for *_, first in rows])


def collate(items, share_prefix=True, pad_id=0, ref_logps=None, max_pairs=1, max_len=10 ** 9):
    """Items with their `pixels` -> one batch: packed tensors, pixels (U, F, 3, S, S) of the rows' videos once each
    with row_video (N,) indexing them, ids, weights (0 for a pair whose video could not be read: it keeps the batch's
    shape and adds nothing), reference log-probs by content key."""
    batch = pack_pairs(items, share_prefix, pad_id, max_pairs, max_len)
    row_pair = batch.pop("row_pair")
    firsts = list(dict.fromkeys(row_pair))  # the pairs whose frames feed a row, once each, in order
    batch["pixels"] = torch.stack([items[f]["pixels"] for f in firsts])
    batch["row_video"] = torch.tensor([firsts.index(f) for f in row_pair])
    batch["ids"] = [it["id"] for it in items]
    batch["ref_keys"] = [it.get("ref_key") for it in items]
    batch["categories"] = [it["category"] for it in items]
    batch["weights"] = torch.tensor([float(it.get("ok", True)) for it in items])
    batch["errors"] = [dict(id=it["id"], video=it["video"], error=it["error"]) for it in items if "error" in it]
    if ref_logps is not None:
        batch["ref"] = torch.tensor([ref_logps[it["ref_key"]] for it in items])  # (B, 2) [chosen, rejected]
    return batch


# -----------------------------------------------------------------------------
# batches: frames decoded in background processes (timeout, crash isolation), packed in this process


def load_batches(items, index_batches, decode_args, workers=2, timeout=120.0, pad_id=0, ref_logps=None, max_pairs=1,
                 max_len=10 ** 9):
    """Yield one collated batch per index list of `index_batches` (indices into `items`), in order; pairs of one
    video share a row up to `max_pairs` (see pack_pairs). Frames come from video.decode_stream (ordered), each video
    of a batch decoded once: a video that cannot be read, hangs past `timeout` or crashes its decoder gives zero
    pixels and weight 0, and is listed in the batch's `errors`. decode_args = (num_frames, family, image_size)."""
    from video import decode_stream
    videos = [list(dict.fromkeys(items[i]["video"] for i in b)) for b in index_batches]
    wanted = ({"path": v} for vs in videos for v in vs)
    stream = decode_stream(wanted, decode_args, workers, timeout, capacity=2 * max(map(len, index_batches or [[]]))
                           + workers, ordered=True)
    num_frames, _, size = decode_args
    decoded = iter(stream)
    try:
        for b, vs in zip(index_batches, videos):
            frames = {}
            for v in vs:
                _, message = next(decoded)
                frames[v] = message
            group = []
            for i in b:
                item, message = dict(items[i]), frames[items[i]["video"]]
                if message[0] == "ok":
                    item["pixels"] = torch.from_numpy(np.ascontiguousarray(message[1][0]))
                else:
                    item["pixels"], item["ok"] = torch.zeros(num_frames, 3, size, size), False
                    item["error"] = f"{message[1]}: {message[2]}"
                group.append(item)
            yield collate(group, pad_id=pad_id, ref_logps=ref_logps, max_pairs=max_pairs, max_len=max_len)
    finally:
        stream.close()
