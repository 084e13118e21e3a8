"""
Build the demo's mini set with no downloads: synthetic clips (data/demo/scenes.py: a dozen scene classes, risky and
harmless, whose pixels carry the scene) for the loop, other clips of the same classes for pretraining with their true
captions; and, after the loop, the demo's closing table.

    python data/demo/prepare.py [--out=out/demo] [--variants=3] [--pretrain_variants=8]
    python data/demo/prepare.py --out=out/demo --summary=True     # after the loop: the demo's closing table
    python data/demo/prepare.py --out=out/demo --risk_spans=True  # after the split: items.temporal.jsonl, then
    python bench.py config/bench_demo.py --items=out/demo/items.temporal.jsonl --model=out/demo/dpo/final \
        --out_dir=out/demo/bench_temporal --temporal=late,sparse2,sparse4

Then `generate_pairs.py config/pairs_demo.py` over the captions and `data/demo/pretrain.py` make the base model
(see the Makefile's demo target for the whole recipe).
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import records  # noqa: E402
from data.demo.scenes import SCENES, caption, render, scene_of, variant, write_video  # noqa: E402

def described(out):
    """(descriptions that name an object or action of their clip's scene class, descriptions)."""
    descs = records.read_records(os.path.join(out, "descriptions.jsonl"), required=("video", "description"))
    hits = sum(any(w in d["description"].lower() for w in SCENES[scene_of(d["video"])]["words"]) for d in descs
               if scene_of(d["video"]))
    return hits, len(descs)


def cell(m):
    if not m or m.get("value") is None:
        return "n/a"
    return f"{100 * m['value']:.1f} [{100 * m['ci_low']:.0f}, {100 * m['ci_high']:.0f}]"


def summary(out):
    """The demo's closing table from what each step wrote: descriptions, pairs, DPO, and on the held-out videos the
    four rates before and after DPO with 95% Wilson intervals and the exact McNemar p (bench.py --compare), overall
    and per query style."""
    pairs = records.read_records(os.path.join(out, "pairs.jsonl"))
    held = records.read_records(os.path.join(out, "pairs.heldout.jsonl"))
    steps = [m for m in records.read_records(os.path.join(out, "dpo", "metrics.jsonl")) if "loss" in m]
    first, last = steps[0], steps[-1]
    hits, n_desc = described(out)
    n_harm = sum(it["query_type"] == "harmful" for it in held)
    lines = [f"safevid demo in {out}: a toy (a 0.5M-parameter VLM pretrained here on synthetic clips, an offline "
             f"keyword judge); it shows the mechanism, not the safety of any real model",
             f"descriptions      {hits}/{n_desc} name an object or action of their clip's scene class",
             f"pairs             {len(pairs)} ({sum(p['query_type'] == 'harmful' for p in pairs)} harmful); "
             f"held out by video: {n_harm} harmful + {len(held) - n_harm} benign items on "
             f"{len({it['video'] for it in held})} videos",
             f"DPO, {last['step']} steps     reward accuracy {first['rewards_accuracy']:.2f} -> "
             f"{last['rewards_accuracy']:.2f}, margin {first['rewards_margin']:.2f} -> {last['rewards_margin']:.2f}",
             "", f"{'held-out metric, % [95% CI]':<30}{'base':>18}{'after DPO':>18}{'McNemar p':>12}"]
    cmp = json.load(open(os.path.join(out, "bench_cmp", "compare.json")))
    base, dpo = (cmp["runs"][name] for name in ("bench_base", "bench_dpo"))
    p = {r["metric"]: r["p_mcnemar"] for r in cmp["comparisons"][0]["rows"] if r["group"] == "overall"}
    rows = [("safety_rate", "safety (harmful)"), ("attack_success_rate", "attack success (harmful)"),
            ("over_refusal_rate", "over-refusal (benign)"), ("helpfulness", "helpfulness (benign)")]
    for key, name in rows:
        pv = f"{p[key]:.2g}" if p.get(key) is not None else "n/a"
        lines.append(f"{name:<30}{cell(base[key]):>18}{cell(dpo[key]):>18}{pv:>12}")
    for style in sorted(base["per_style"]):
        key = "over_refusal_rate" if style == "benign_sensitive" else "safety_rate"
        b, a = base["per_style"][style][key], dpo["per_style"][style][key]
        name = f"  {style}: {'over-refusal' if key == 'over_refusal_rate' else 'safety'} (n={b['n']})"
        lines.append(f"{name:<30}{cell(b):>18}{cell(a):>18}")
    lines.append(f"report            {os.path.join(out, 'bench_cmp', 'report.md')} (plots: bench_cmp/*.png)")
    print("\n".join(lines))
    return lines


CLIP_SECONDS = 16 / 8  # render's 16 frames at write_video's 8 fps


def risk_items(out):
    """<out>/pairs.heldout.jsonl -> <out>/items.temporal.jsonl: the held-out bench items, each harmful one on a risky
    scene's clip with `risk_span` [0, 2.0] s -- the demo's risky clips show their risk throughout, so the whole clip
    is the honest span -- for bench.py --temporal. Returns (path, items with a span)."""
    items = records.read_records(os.path.join(out, "pairs.heldout.jsonl"))
    for it in items:
        scene = scene_of(it["video"])
        if it["query_type"] == "harmful" and scene and SCENES[scene]["risky"]:
            it["risk_span"] = [0.0, CLIP_SECONDS]
    path = os.path.join(out, "items.temporal.jsonl")
    records.write_records(path, items)
    return path, sum("risk_span" in it for it in items)


def write_clips(folder, seed, split, variants):
    """`variants` clips per scene class in `folder`, named `<scene>_<k>.mp4`; returns [(relative path, caption)]."""
    os.makedirs(folder, exist_ok=True)
    clips = []
    for scene in SCENES:
        for k in range(variants):
            v = variant(scene, seed, split, k)
            name = f"{scene}_{k:02d}.mp4"
            if not os.path.exists(os.path.join(folder, name)):
                write_video(os.path.join(folder, name), render(scene, v))
            clips.append((name, caption(scene, v)))
    return clips


def main(out="out/demo", variants=3, pretrain_variants=8, seed=0):
    """The loop's clips in <out>/videos; the pretraining clips (other variants of the same scene classes) in
    <out>/pretrain/videos with their true captions in <out>/pretrain/captions.jsonl, in the descriptions format, so
    that generate_pairs.py can turn them into the pretraining instructions."""
    write_clips(os.path.join(out, "videos"), seed, 1, variants)
    clips = write_clips(os.path.join(out, "pretrain", "videos"), seed, 0, pretrain_variants)
    records.write_records(os.path.join(out, "pretrain", "captions.jsonl"),
                          [dict(id=records.video_id(name), video=name, description=text, num_frames=16,
                                model="ground truth") for name, text in clips])
    print(f"demo set in {out}: videos/ ({variants * len(SCENES)} clips of {len(SCENES)} scene classes for the loop), "
          f"pretrain/ ({len(clips)} other clips of the same classes and their captions)")


if __name__ == "__main__":
    from configurator import configure
    cfg = configure(dict(out="out/demo", variants=3, pretrain_variants=8, seed=0, summary=False, risk_spans=False),
                    sys.argv[1:])
    if cfg.pop("risk_spans"):
        path, n = risk_items(cfg["out"])
        print(f"{path}: the held-out items, {n} harmful ones on risky clips with a risk_span (bench.py --temporal)")
    elif cfg.pop("summary"):
        summary(cfg["out"])
    else:
        main(**cfg)
