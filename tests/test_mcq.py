"""Capability kept: multiple-choice video QA scored by option log-likelihood. The prefix-shared batched scorer against
a separate plain forward per option (fp32, 1e-5) on the tiny checkpoint and PyAV clips; bench.py --mcq end to end
(records, accuracy with its interval, an unreadable video, resume) and --compare showing mcq_accuracy before/after;
answer normalisation; the MVBench and Video-MME importers on fixtures written in their published layouts.

    .venv/bin/python -m pytest -q tests/test_mcq.py
"""
import json
import os

import pytest
import torch

import bench
import report
from tests.media import write_video
from tests.test_bench import cfg_for, lines, write_jsonl
from tests.tiny import make_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcq")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    (root / "videos").mkdir()
    for i in range(2):
        write_video(str(root / "videos" / f"{i}.mp4"), num_frames=10 + 3 * i)
    (root / "videos" / "broken.mp4").write_text("not a video")
    return root, ckpt


def mcq_items():
    return [dict(id="q0", video="0.mp4", question="What moves in the video?", options=["a box", "a car", "nothing"],
                 answer="B", task="object"),
            dict(id="q1", video="1.mp4", question="Is it safe to copy?", options=["yes", "no, call for help"],
                 answer=1, task="safety"),
            dict(id="q2", video="0.mp4", question="What colour is the screen?",
                 options=["black and white", "red", "green", "the video shows a kitchen"], answer="red",
                 task="object")]


def direct_logprob(vlm, prompt, option, pixels):
    """Σ log p(option | prompt) with one plain causal forward of prompt + option (no layout, no sharing)."""
    ids = torch.tensor([prompt + option])
    with torch.no_grad():
        logp = torch.log_softmax(vlm(ids, pixel_values_videos=pixels).double(), -1)[0]  # (T, V)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(option))


def test_batched_option_scores_equal_per_option_forwards(setup):
    from model import VLM
    from tokenizer import Tokenizer
    from video import decode_video
    root, ckpt = setup
    tok, vlm = Tokenizer.from_pretrained(ckpt), VLM.from_pretrained(ckpt).eval()
    F = 4
    n_video = vlm.num_video_tokens(F)
    items = mcq_items()
    pixels = [torch.from_numpy(decode_video(str(root / "videos" / it["video"]), F, vlm.config.family,
                                            vlm.config.vision.image_size)[0])[None] for it in items]
    prompts = [tok.video_prompt(bench.mcq_text(it), n_video) for it in items]
    options = [[tok.response(o) for o in it["options"]] for it in items]
    with torch.no_grad():
        feats = vlm.video_features(torch.cat(pixels))  # (3, n_video, H)
    got = bench.option_logprobs(vlm, prompts, options, feats)  # items of 3, 2 and 4 options in one batch
    for b, it in enumerate(items):
        want = [direct_logprob(vlm, prompts[b], o, pixels[b]) for o in options[b]]
        assert got[b] == pytest.approx(want, abs=1e-5), (b, got[b], want)
    assert len({round(x, 3) for x in got[2]}) == 4  # the options really score differently


def test_bench_mcq_run_resume_and_compare(setup, tmp_path):
    root, ckpt = setup
    its = mcq_items() + [dict(id="q3", video="broken.mp4", question="q", options=["a", "b"], answer=0)]
    cfg = cfg_for(tmp_path, mcq=write_jsonl(tmp_path / "mcq.jsonl", its), model=ckpt, items="",
                  video_root=str(root / "videos"), num_frames=4, batch_size=2)
    s = bench.run(cfg)
    recs = {r["id"]: r for r in lines(tmp_path / "run/mcq.jsonl")}
    assert set(recs) == {"q0", "q1", "q2"} and [e["id"] for e in lines(tmp_path / "run/mcq.errors.jsonl")] == ["q3"]
    for r in recs.values():
        assert r["pred"] == max(range(len(r["scores"])), key=r["scores"].__getitem__)
        assert r["correct"] == (r["pred"] == r["answer"])
    assert (recs["q0"]["answer"], recs["q1"]["answer"], recs["q2"]["answer"]) == (1, 1, 1)
    k = sum(r["correct"] for r in recs.values())
    m = s["mcq_accuracy"]
    assert (m["k"], m["n"]) == (k, 3) and (m["ci_low"], m["ci_high"]) == pytest.approx(report.wilson(k, 3))
    assert s["mcq_unreadable"] == 1 and s["mcq_unscored"] == 0 and s["status"] == "done"
    assert set(s["mcq_per_task"]) == {"object", "safety"} and s["mcq_per_task"]["object"]["n"] == 2
    assert "multiple-choice video QA" in (tmp_path / "run/report.md").read_text()
    # the scores in the record are the direct computation's
    from model import VLM
    from tokenizer import Tokenizer
    from video import decode_video
    tok, vlm = Tokenizer.from_pretrained(ckpt), VLM.from_pretrained(ckpt).eval()
    px = torch.from_numpy(decode_video(str(root / "videos/1.mp4"), 4, vlm.config.family,
                                       vlm.config.vision.image_size)[0])[None]
    prompt = tok.video_prompt(bench.mcq_text(its[1]), vlm.num_video_tokens(4))
    assert recs["q1"]["scores"] == pytest.approx([direct_logprob(vlm, prompt, tok.response(o), px)
                                                   for o in its[1]["options"]], abs=1e-5)
    before = (tmp_path / "run/mcq.jsonl").read_text()
    assert bench.run(cfg)["mcq_accuracy"]["n"] == 3 and (tmp_path / "run/mcq.jsonl").read_text() == before
    # --compare: a second run whose records say otherwise (every item right) -> mcq_accuracy before/after
    other = tmp_path / "after"
    other.mkdir()
    write_jsonl(other / "mcq.jsonl", [dict(r, correct=True) for r in recs.values()])
    comps = report.compare([str(tmp_path / "run"), str(other)], str(tmp_path / "cmp"), 2.85, n_boot=200)
    row = next(r for r in comps[0]["rows"] if r["metric"] == "mcq_accuracy")
    assert (row["n"], row["a"], row["b"]) == (3, pytest.approx(k / 3), 1.0)
    assert "mcq_accuracy" in (tmp_path / "cmp/report.md").read_text()


def test_mcq_items_are_checked(tmp_path):
    good = dict(id="a", video="v.mp4", question="q", options=["x", "y"], answer="y")
    assert bench.load_mcq(write_jsonl(tmp_path / "a.jsonl", [good]))[0]["answer_index"] == 1
    for bad, msg in [(dict(good, answer="C"), "answer 'C'"), (dict(good, options=["x"]), "two or more"),
                     (dict(good, answer=2), "answer 2")]:
        with pytest.raises(ValueError, match=msg):
            bench.load_mcq(write_jsonl(tmp_path / "b.jsonl", [bad]))
    with pytest.raises(ValueError, match="--model"):
        bench.run(cfg_for(tmp_path, mcq=write_jsonl(tmp_path / "a.jsonl", [good]), answers="x.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# importers, on fixtures in the releases' layouts


def load_prepare(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"{name}_prepare", os.path.join(REPO, "data", name, "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mvbench_importer(tmp_path):
    mvb = load_prepare("mvbench")
    src = tmp_path / "MVBench"
    (src / "json").mkdir(parents=True)
    (src / "video" / "star" / "Charades_v1_480").mkdir(parents=True)
    (src / "video" / "star" / "Charades_v1_480" / "6H78U.mp4").write_bytes(b"x")
    (src / "video" / "clevrer" / "video_validation").mkdir(parents=True)
    (src / "video" / "clevrer" / "video_validation" / "video_10000.mp4").write_bytes(b"x")
    (src / "json" / "action_sequence.json").write_text(json.dumps([
        {"video": "6H78U.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle.",
                        "Took the box."], "answer": "Ate the medicine.", "start": 11.1, "end": 19.6},
        {"video": "missing.mp4", "question": "q", "candidates": ["a", "b"], "answer": "a"}]))
    (src / "json" / "moving_count.json").write_text(json.dumps([
        {"video": "video_10000.mp4", "question": "How many metal objects enter the scene?",
         "candidates": ["3", "2", "1", "0"], "answer": "1"}]))
    out = tmp_path / "mvb.jsonl"
    s = mvb.run(dict(src=str(src), out=str(out)))
    assert s == dict(items=2, missing_video=1, tasks=2, status="done")
    items = {it["id"]: it for it in bench.load_mcq(str(out))}  # valid MCQ items
    a = items["mvbench-action_sequence-0"]
    assert a["video"] == "video/star/Charades_v1_480/6H78U.mp4" and a["answer_index"] == 0
    assert (a["task"], a["start"], a["end"], len(a["options"])) == ("action_sequence", 11.1, 19.6, 4)
    assert items["mvbench-moving_count-0"]["answer_index"] == 2
    (src / "json" / "bad.json").write_text(json.dumps([{"video": "6H78U.mp4", "question": "q"}]))
    with pytest.raises(ValueError, match="lacks"):
        mvb.convert(str(src))


def test_videomme_importer(tmp_path):
    vmme = load_prepare("videomme")
    src = tmp_path / "Video-MME"
    (src / "data").mkdir(parents=True)
    (src / "data" / "fFjv93ACGo8.mp4").write_bytes(b"x")
    rec = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
           "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
           "task_type": "Counting Problem", "question": "When demonstrating the Germany modern Christmas tree is "
           "initially decorated with apples, candles and berries, which kind of the decoration has the largest "
           "number?", "options": ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same "
                                  "number."], "answer": "C"}
    (src / "videomme").mkdir()
    (src / "videomme" / "test.json").write_text(json.dumps([rec, dict(rec, question_id="002-1", videoID="nope")]))
    (src / "notes.json").write_text(json.dumps({"readme": True}))
    out = tmp_path / "vmme.jsonl"
    s = vmme.run(dict(src=str(src), out=str(out)))
    assert s == dict(items=1, missing_video=1, skipped_files=1, status="done")
    it = bench.load_mcq(str(out))[0]
    assert (it["id"], it["video"], it["answer_index"], it["task"]) == ("videomme-001-1", "data/fFjv93ACGo8.mp4", 2,
                                                                     "Counting Problem")
    assert it["options"] == ["Apples.", "Candles.", "Berries.", "The three kinds are of the same number."]
