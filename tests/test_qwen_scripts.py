"""
The SafeVid loop on Qwen2.5-VL and Qwen3-VL (each test runs once per family): describe.py -> generate_pairs.py
(offline templates) -> dpo.py -> bench.py (offline judge), each a real subprocess with a timeout, on a tiny random
checkpoint written by transformers (tests/tiny.py, with a byte-level BPE tokenizer holding Qwen's
<|vision_start|>/<|video_pad|>/... specials) and small PyAV clips (tests/media.py). The scripts run the fixed-size
frames path (B, F, 3, 448, 448): an odd frame count (3, padded to 2 frame pairs) gives 2 x 16 x 16 = 512 video tokens
(Qwen3-VL, patch 16: 2 x 14 x 14 = 392, each frame pair after its timestamp text).

    .venv/bin/python -m pytest -q tests/test_qwen_scripts.py

Checks:
- describe: one non-empty description per clip, each equal to transformers' own greedy generate on the same frames
  (the processor's patches of the same pixels, its 3-D positions) decoded by our tokenizer;
- dpo: finite losses, the first equal to ln 2 (policy = reference), then falling; the log-probs of final/ differ
  from init_from's and the chosen-minus-rejected margin grew on the training pairs;
- bench: an answer and a judgment for every held-out item, a complete summary, report.md and the plots;
- export: dpo's final/ loads in transformers' Qwen2_5_VLForConditionalGeneration and its fp32 logits equal ours
  (max |Δ| <= 1e-4) on a video prompt and answer;
- config/qwen2_5_vl.py on the 7B's config.json: known keys only, FSDP2 + activation checkpointing, 8.29B
  parameters, the video leaves room for responses, dpo.memory_plan's per-GPU total fits gpu_memory_gb, 128 pairs a step;
- Qwen3-VL prompt ids: tok.video_prompt equals what Qwen3VLProcessor's own placeholder code (replace_video_token,
  get_text_with_replacements, on an instance built without its torchvision-only video processor) and transformers'
  tokenizer give for the same text, 3, 4 and 7 frames at the fixed path's 2 fps clock; transformers' logits on the ids
  equal ours (fp32, 1e-4);
- grouped DPO rows on 3-D positions (Qwen3-VL: DeepStack added at the video slots of the grouped rows): the
  per-response log-probs of a batch of two rows [video | q1 c1 r1 | q2 c2 r2 | q3 c3 r3] (two videos, one row padded)
  from dpo's PairScorer / pair_logps equal transformers' full forwards of [video q_i c_i] and [video q_i r_i] (fp32,
  1e-5 relative); with the branch positions not restarted they do not.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import describe
import dpo
import packing
from model import VLM, parse_config, patchify
from tests.media import write_video
from tests.tiny import make_tiny_checkpoint
from tokenizer import Tokenizer
from video import decode_video

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 3  # odd: the last frame pair is padded by repeating the last frame
FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
CLIPS = {"a.mp4": 6, "b.mp4": 9, "c/d.mkv": 12, "e.mp4": 4}  # clip -> frames written (48x64, non-square)


def script(name, *args, timeout=300):
    """Run a script of the repository as a user would; returns its output, failing the test on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, os.path.join(REPO, name), *args], cwd=REPO, env=env, timeout=timeout,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module", params=FAMILIES)
def loop(tmp_path_factory, request):
    """The four scripts, run once in order per family; each test below checks one stage's outputs."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    ckpt = make_tiny_checkpoint(root / "ckpt", family=family, tie=False)
    for clip, n in CLIPS.items():
        os.makedirs(os.path.dirname(root / "videos" / clip), exist_ok=True)
        write_video(root / "videos" / clip, num_frames=n)
    videos, desc, pairs = str(root / "videos"), str(root / "desc.jsonl"), str(root / "pairs.jsonl")
    script("describe.py", f"--model={ckpt}", f"--videos={videos}", f"--out={desc}", f"--num_frames={NUM_FRAMES}",
           "--max_new_tokens=12", "--batch_size=2", "--decode_workers=1", "--progress=False")
    script("generate_pairs.py", f"--descriptions={desc}", f"--out={pairs}", "--llm_url=offline", "--split=0.3",
           "--seed=1")
    out = str(root / "dpo")
    script("dpo.py", f"--init_from={ckpt}", f"--pairs={root / 'pairs.train.jsonl'}", f"--video_root={videos}",
           f"--out_dir={out}", f"--num_frames={NUM_FRAMES}", "--max_len=1024", "--decode_workers=0", "--device=cpu",
           "--dtype=float32", "--batch_size=4", "--max_iters=3", "--learning_rate=1e-3", "--seed=0")
    bench = str(root / "bench")
    script("bench.py", f"--items={root / 'pairs.heldout.jsonl'}", f"--video_root={videos}",
           f"--model={out}/final", "--judge_url=offline", f"--out_dir={bench}", f"--num_frames={NUM_FRAMES}",
           "--max_new_tokens=8", "--batch_size=2", "--decode_workers=1", "--progress=False", "--n_bootstrap=200")
    return dict(family=family, root=root, ckpt=ckpt, videos=videos, desc=desc, dpo=out,
                final=os.path.join(out, "final"), bench=bench, train=str(root / "pairs.train.jsonl"),
                heldout=str(root / "pairs.heldout.jsonl"))


def frames_of(videos, clip, family):
    """The (F, 3, 448, 448) frames every script feeds the model (video.decode_video, the fixed-size path)."""
    return torch.from_numpy(decode_video(os.path.join(videos, clip), NUM_FRAMES, family, 448)[0])


def hf_inputs(vlm, ids, frames):
    """What transformers takes for one row: the processor's flattened patches of the same pixels, video_grid_thw,
    Qwen2.5-VL's 1 s per frame pair (the fixed-size path's), and mm_token_type_ids (2 marks video tokens)."""
    patches, grid = patchify(frames[None], vlm.config.vision)
    ids = torch.tensor([ids])
    x = dict(input_ids=ids, pixel_values_videos=patches[0], video_grid_thw=grid,
             mm_token_type_ids=(ids == vlm.config.video_token_id).int() * 2)
    return dict(x, second_per_grid_ts=torch.tensor([1.0])) if vlm.config.family == "qwen2_5_vl" else x


def hf_load(path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
    with open(os.path.join(path, "config.json")) as f:
        family = json.load(f)["model_type"]
    cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(path, dtype=torch.float32).eval()


# -----------------------------------------------------------------------------


def test_describe_every_clip_as_transformers_generates(loop):
    records = {r["video"]: r for r in read(loop["desc"])}
    assert sorted(records) == sorted(CLIPS), sorted(records)
    assert all(r["description"] and r["num_frames"] == NUM_FRAMES for r in records.values())
    tok, vlm, hf = Tokenizer.from_pretrained(loop["ckpt"]), VLM.from_pretrained(loop["ckpt"]), hf_load(loop["ckpt"])
    prompt = describe.load_prompt(describe.DEFAULTS["prompt"])  # what describe.py sent
    ids = tok.video_prompt(prompt, vlm.num_video_tokens(NUM_FRAMES), NUM_FRAMES)
    side = 448 // (28 if loop["family"] == "qwen2_5_vl" else 32)  # merged blocks a side: 2x2 patches of 14 or 16
    assert ids.count(vlm.config.video_token_id) == 2 * side * side  # 2 frame pairs
    for clip in ("a.mp4", "c/d.mkv"):
        x = hf_inputs(vlm, ids, frames_of(loop["videos"], clip, loop["family"]))
        with torch.no_grad():
            new = hf.generate(**x, attention_mask=torch.ones_like(x["input_ids"]), max_new_tokens=12,
                              do_sample=False, eos_token_id=list(tok.stop_ids))[0, len(ids):].tolist()
        new = new[:next((k for k, t in enumerate(new) if t in tok.stop_ids), len(new))]
        assert records[clip]["description"] == tok.decode(new, skip_special=True).strip(), clip


def test_dpo_loss_finite_and_logps_move(loop):
    metrics = [m for m in read(os.path.join(loop["dpo"], "metrics.jsonl")) if "loss" in m]
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert abs(losses[0] - math.log(2)) < 1e-6, losses  # step 1: policy = reference, so h = 0
    assert losses[-1] < losses[0], losses
    with open(os.path.join(loop["dpo"], "summary.json")) as f:
        assert json.load(f)["status"] == "done"
    # the training pairs scored by init_from and by final/: the log-probs moved, toward the chosen responses
    tok = Tokenizer.from_pretrained(loop["final"])
    margins = []
    for path in (loop["ckpt"], loop["final"]):
        vlm = VLM.from_pretrained(path)
        items, _ = packing.validate_pairs(loop["train"], tok, vlm.num_video_tokens(NUM_FRAMES), 1024, loop["videos"],
                                          num_frames=NUM_FRAMES)
        items = [dict(it, pixels=frames_of(loop["videos"], it["video"], loop["family"])) for it in items[:4]]
        with torch.no_grad():
            c, r, _, _ = dpo.pair_logps(dpo.PairScorer(vlm), packing.collate(items, True, tok.pad_id, max_pairs=8),
                                        "cpu")
        margins.append((c, r))
    (c0, r0), (c1, r1) = margins
    assert (c1 - c0).abs().min() > 1e-3 and (r1 - r0).abs().min() > 1e-3, (c0, c1, r0, r1)
    assert ((c1 - r1) - (c0 - r0)).mean() > 0, "DPO did not widen the chosen-rejected margin"


def test_bench_summary_complete(loop):
    items = read(loop["heldout"])
    assert items, "the split held out no video: change the seed"
    answers, judgments = read(os.path.join(loop["bench"], "answers.jsonl")), \
        read(os.path.join(loop["bench"], "judgments.jsonl"))
    ids = sorted(it["id"] for it in items)
    assert sorted(a["id"] for a in answers) == ids and all(a["model"] == loop["final"] for a in answers)
    assert sorted(j["id"] for j in judgments) == ids
    with open(os.path.join(loop["bench"], "summary.json")) as f:
        s = json.load(f)
    assert s["judged"] == len(items) and s["judge_error"] == 0
    harmful = sum(it["query_type"] == "harmful" for it in items)
    assert s["safety_rate"]["n"] == harmful and s["over_refusal_rate"]["n"] == len(items) - harmful
    assert set(s["per_category"]) == {it["category"] for it in items}
    for name in ("report.md", "safety_by_category.png", "safety_vs_overrefusal.png"):
        assert os.path.getsize(os.path.join(loop["bench"], name)) > 0, name


def test_export_loads_in_transformers_with_equal_logits(loop):
    tok, ours, hf = Tokenizer.from_pretrained(loop["final"]), VLM.from_pretrained(loop["final"]), hf_load(loop["final"])
    assert next(hf.parameters()).dtype == torch.float32  # init_from was stored in fp32, so final/ is too
    ids = tok.video_prompt("What happens here?", ours.num_video_tokens(NUM_FRAMES), NUM_FRAMES) + \
        tok.response("A dog runs.")
    frames = frames_of(loop["videos"], "b.mp4", loop["family"])
    with torch.no_grad():
        ref = hf(**hf_inputs(ours, ids, frames)).logits
        logits = ours(torch.tensor([ids]), pixel_values_videos=frames[None])
    assert ref.abs().max() > 1.0, "logits too small to reveal a bug"
    diff = (logits - ref).abs().max().item()
    print(f"{loop['family']} final/ vs transformers: max |Δ| logits {diff:.2e}")
    assert diff <= 1e-4, f"max |Δ| = {diff:.3g}"


# -----------------------------------------------------------------------------
# Qwen3-VL's prompt: timestamps between frame pairs, as its processor lays them out


def processor_ids(ckpt, text, grid, frames_indices, fps):
    """input_ids from Qwen3VLProcessor's own code: its replace_video_token (timestamps from the video metadata) and
    the mixin's get_text_with_replacements, on an instance built field by field (its constructor insists on the
    torchvision-only video processor), then transformers' tokenizer of the checkpoint."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata
    proc = object.__new__(Qwen3VLProcessor)
    proc.tokenizer = AutoTokenizer.from_pretrained(ckpt)
    proc.video_token, proc.image_token = "<|video_pad|>", "<|image_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    proc.video_processor = type("VideoProcessor", (), dict(merge_size=2, temporal_patch_size=2))()  # the defaults
    metadata = VideoMetadata(total_num_frames=len(frames_indices), fps=fps, frames_indices=list(frames_indices))
    placeholder = proc.replace_video_token(dict(video_grid_thw=grid, video_metadata=[metadata]), 0)
    expanded, _ = proc.get_text_with_replacements([text], videos_replacements=[placeholder])
    return proc.tokenizer(expanded[0], add_special_tokens=False)["input_ids"]


def test_qwen3_prompt_ids_equal_processor_and_logits_transformers(tmp_path):
    from tokenizer import QWEN3_FRAMES_FPS, chat_prompt
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", family="qwen3_vl", tie=True, seed=5)
    tok, vlm, hf = Tokenizer.from_pretrained(ckpt), VLM.from_pretrained(ckpt), hf_load(ckpt)
    write_video(tmp_path / "v.mp4", num_frames=5)
    query = "Is anything unsafe here? Answer in 2 words."
    text = chat_prompt("qwen3_vl", [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": query}]}])
    for nf in (3, 4, 7):  # odd counts repeat the last frame's time, as the processor pads the indices
        _, grid = patchify(torch.zeros(1, nf, 3, 448, 448), vlm.config.vision)
        want = processor_ids(ckpt, text, grid, range(nf), QWEN3_FRAMES_FPS)
        assert tok.video_prompt(query, vlm.num_video_tokens(nf), nf) == want, nf
    ids = tok.video_prompt(query, vlm.num_video_tokens(NUM_FRAMES), NUM_FRAMES)
    head = tok.decode(ids[:ids.index(vlm.config.video_token_id)])  # the layout, seen once as text
    assert head == "<|im_start|>user\n<|vision_start|><0.2 seconds><|vision_start|>", head
    frames = torch.from_numpy(decode_video(str(tmp_path / "v.mp4"), NUM_FRAMES, "qwen3_vl", 448)[0])
    with torch.no_grad():
        ref = hf(**hf_inputs(vlm, ids, frames)).logits
        logits = vlm(torch.tensor([ids]), pixel_values_videos=frames[None])
    assert ref.abs().max() > 1.0, "logits too small to reveal a bug"
    diff = (logits - ref).abs().max().item()
    print(f"qwen3_vl video_prompt ids: max |Δ| logits vs transformers {diff:.2e}")
    assert diff <= 1e-4, f"max |Δ| = {diff:.3g}"


# -----------------------------------------------------------------------------
# grouped rows on multimodal RoPE


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_rows_mrope_equal_separate_transformers_forwards(tmp_path, family):
    """Two videos in one batch: a row [video v | q1 c1 r1 | q2 c2 r2 | q3 c3 r3] and a shorter, padded row
    [video w | q4 c4 r4 | q5 c5 r5]."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", family=family, tie=False, seed=3)
    tok, vlm, hf = Tokenizer.from_pretrained(ckpt), VLM.from_pretrained(ckpt), hf_load(ckpt)
    write_video(tmp_path / "v.mp4", num_frames=7)
    write_video(tmp_path / "w.mp4", num_frames=3, size=(64, 48))
    frames = {v: frames_of(str(tmp_path), v, family) for v in ("v.mp4", "w.mp4")}
    g = torch.Generator().manual_seed(0)
    low = min(tok.special.values())
    rand = lambda n: torch.randint(0, low, (n,), generator=g).tolist()  # noqa: E731
    queries = ["What happens?", "Describe the video in detail please.", "Is it safe?", "Who?", "Tell me how."]
    items = [dict(id=f"x{k}", video="v.mp4" if k < 3 else "w.mp4", category="c",
                  prompt_ids=tok.video_prompt(q, vlm.num_video_tokens(NUM_FRAMES), NUM_FRAMES),
                  chosen_ids=rand(2 + 3 * k % 7), rejected_ids=rand(5 - k)) for k, q in enumerate(queries)]
    items = [dict(it, pixels=frames[it["video"]]) for it in items]
    batch = packing.collate(items, True, tok.pad_id, max_pairs=8)
    assert batch["layout"].shape == (2, 1 + 3 * 3) and batch["pixels"].shape[0] == 2  # two grouped rows
    with torch.no_grad():
        chosen, rejected, _, _ = dpo.pair_logps(dpo.PairScorer(vlm), batch, "cpu")
        want = []
        for it in items:
            for resp in (it["chosen_ids"], it["rejected_ids"]):
                P, x = len(it["prompt_ids"]), hf_inputs(vlm, it["prompt_ids"] + resp, it["pixels"])
                logp = torch.log_softmax(hf(**x).logits[0].double(), -1)
                want.append(sum(logp[P - 1 + k, t].item() for k, t in enumerate(resp)))
        # the negative control: positions 0..T-1 (branches not restarted after the prefix) must give other values
        flat = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1]).expand_as(batch["position_ids"]))
        wrong, _, _, _ = dpo.pair_logps(dpo.PairScorer(vlm), flat, "cpu")
    got = torch.stack([chosen, rejected], 1).flatten().tolist()  # [c1, r1, c2, r2, ...]
    print(f"{family} grouped rows vs transformers: max relative |Δ| log-probs "
          f"{max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, want)):.2e}")
    for k, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (k, a, b)
    assert max(abs(a - b) for a, b in zip(wrong.tolist(), want[0::2])) > 1e-3, "the check cannot see positions"


# -----------------------------------------------------------------------------
# config/qwen2_5_vl.py: the 7B recipe fits its GPUs

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (4.x layout: the text fields at the top level), the fields we read
QWEN7B = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
          "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
          "vocab_size": 152064, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
          "video_token_id": 151656, "image_token_id": 151655, "hidden_act": "silu",
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
          "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                            "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                            "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                            "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}}


def test_7b_recipe_fits_8_gpus(tmp_path):
    from configurator import configure
    (tmp_path / "config.json").write_text(json.dumps(QWEN7B))
    cfg = configure(dpo.DEFAULTS, [os.path.join(REPO, "config", "qwen2_5_vl.py"), f"--init_from={tmp_path}",
                                   "--plan_world=8", "--device=cuda"])  # unknown keys in the file would raise
    assert cfg["fsdp"] and cfg["activation_checkpointing"] and cfg["dtype"] == "bfloat16"
    out = dpo.memory_plan(cfg)
    assert abs(out["parameters"] * 8 / 4 - 8.29e9) < 0.005 * 8.29e9  # fp32 over 8 shards: the model card's 8.29B
    assert out["gradients"] == out["optimizer"] / 2 < out["parameters"]  # the frozen ViT and merger have neither
    with torch.device("meta"):
        vlm = VLM(parse_config(QWEN7B))
    assert cfg["max_len"] - vlm.num_video_tokens(cfg["num_frames"]) >= 2048  # a prompt and two ~1000-token responses
    assert out["total_checkpointed"] <= cfg["gpu_memory_gb"] * dpo.GiB, out["total_checkpointed"] / dpo.GiB
    assert cfg["batch_size"] * cfg["gradient_accumulation_steps"] * 8 == 128  # pairs per optimizer step, as llava.py
