"""lora.py against PEFT + transformers (the oracles) on the tiny random checkpoint, fp32, every position; and LoRA DPO.

Covers: our names <-> transformers 5 names; at init (B = 0) the adapted model equals the base exactly, and
adapters_disabled gives the base back after training-like changes; only A, B (and modules_to_save) get gradients;
PEFT loads our adapter_model.safetensors on the transformers model with equal logits (and we load PEFT's);
merging (in place, and on a state dict saved as an HF checkpoint) gives the same logits in transformers; frozen
weights in bf16 are bit-identical under bf16 autocast. DPO with lora_rank > 0: step-1 loss = ln 2 and policy ==
reference; it learns; kill -9 and resume equal an uninterrupted run; torchrun DDP equals one process.

    .venv/bin/python -m pytest -q tests/test_lora.py
"""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import dpo
import lora
from model import VLM, canonical_name
from tests.tiny import make_tiny_checkpoint

ATOL = 1e-5  # fp32 logits ~10; our attention vs SDPA differs by ~1e-6 (the bound for the adapter)
MERGED_ATOL = 1e-4  # a merged weight rounds W + ΔW once more in fp32: ~1e-5 on these logits (test_model's bound)
NUM_FRAMES = 2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "ckpt", tie=False)


def inputs(model, batch=2, seed=0):
    """input_ids (4 text, the expanded video, 7 text) and pixel_values_videos (B, F, 3, S, S) ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    text = torch.randint(0, 200, (batch, 11), generator=g)
    video = torch.full((batch, model.num_video_tokens(NUM_FRAMES)), c.video_token_id)
    ids = torch.cat([text[:, :4], video, text[:, 4:]], dim=1)
    pixels = torch.randn(batch, NUM_FRAMES, 3, c.vision.image_size, c.vision.image_size, generator=g)
    return ids, pixels


def assert_close(ours, ref, what, atol=ATOL):
    diff = (ours.float() - ref.float()).abs().max().item()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert diff <= atol, f"{what}: max |Δ| = {diff:.3g} > {atol}"
    print(f"{what}: max |Δ| = {diff:.3g}")


def randomize(vlm, seed=1, projector=False):
    """Non-zero B (at init it is 0, which would hide every bug) and, optionally, a changed projector."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vlm.named_parameters():
            if ".lora_B." in name or (projector and name.startswith("multi_modal_projector.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def hf_logits(path, ids, pixels, adapter=None, merge=False):
    from transformers import AutoConfig, LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration
    family = AutoConfig.from_pretrained(path).model_type
    cls = (LlavaOnevisionForConditionalGeneration if family == "llava_onevision"
           else LlavaNextVideoForConditionalGeneration)
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).eval()
        if merge:
            model = model.merge_and_unload()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values_videos=pixels).logits


# -----------------------------------------------------------------------------
# names and the adapter's effect


def test_names_round_trip(ckpt):
    vlm = VLM.from_pretrained(ckpt)
    for key in vlm.state_dict():
        assert canonical_name(lora.hf_name(key), vlm.config.family) == key, key
    names = lora.add_lora(vlm, rank=4, alpha=8)
    assert len(names) == 7 * vlm.config.text.num_layers
    assert lora.hf_name(names[0]).startswith("model.language_model.layers.0.")
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        lora.add_lora(VLM.from_pretrained(ckpt), rank=4, alpha=8, targets="nothing")


def test_init_is_identity_disable_restores_base_and_only_adapters_train(ckpt):
    vlm = VLM.from_pretrained(ckpt)
    ids, pixels = inputs(vlm)
    with torch.no_grad():
        base = vlm(ids, pixels)
    lora.add_lora(vlm, rank=4, alpha=8, dropout=0.1)
    vlm.eval()
    with torch.no_grad():
        assert torch.equal(vlm(ids, pixels), base), "B = 0 must leave the output bit-identical"
    randomize(vlm)
    with torch.no_grad():
        moved = vlm(ids, pixels)
        with lora.adapters_disabled(vlm):
            assert torch.equal(vlm(ids, pixels), base), "adapters_disabled must give the base model exactly"
    assert (moved - base).abs().max() > 0.1, "a random B must change the logits"
    vlm.train()
    vlm(ids, pixels).logsumexp(-1).sum().backward()
    graded = {n for n, p in vlm.named_parameters() if p.grad is not None}
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert graded == trainable and all(".lora_" in n for n in trainable), sorted(graded)[:4]
    assert all(p.dtype == torch.float32 for n, p in vlm.named_parameters() if ".lora_" in n)


# -----------------------------------------------------------------------------
# PEFT interop: transformers + peft are the oracle


@pytest.mark.parametrize("projector", [False, True], ids=["lm", "lm+projector"])
def test_peft_loads_our_adapter_with_equal_logits(ckpt, tmp_path, projector):
    vlm = VLM.from_pretrained(ckpt)
    lora.add_lora(vlm, rank=4, alpha=12, modules_to_save=["multi_modal_projector"] if projector else ())
    randomize(vlm, projector=projector)
    vlm.eval()
    ids, pixels = inputs(vlm)
    with torch.no_grad():
        ours = vlm(ids, pixels)
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(vlm, adapter)
    from safetensors import safe_open
    with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert ("base_model.model.model.multi_modal_projector.linear_1.weight" in keys) == projector
    assert_close(hf_logits(ckpt, ids, pixels, adapter), ours, "PEFT + transformers vs ours with the adapter")
    assert_close(hf_logits(ckpt, ids, pixels, adapter, merge=True), ours, "PEFT merge_and_unload vs ours",
                 MERGED_ATOL)
    # and back: our loader reads the file into a fresh model bit-exactly
    again = lora.load_adapter(VLM.from_pretrained(ckpt), adapter).eval()
    with torch.no_grad():
        assert torch.equal(again(ids, pixels), ours)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_peft_loads_our_adapter_on_qwen_with_equal_logits(tmp_path, family):
    """The Qwen families: our adapter (every LM layer's q/k/v/o + MLP, random B) loaded by PEFT onto transformers'
    Qwen model gives our logits, on the scripts' fixed-size frames path (3-D positions, DeepStack for Qwen3-VL)."""
    from peft import PeftModel
    from tests.test_qwen_scripts import hf_inputs, hf_load
    from tokenizer import Tokenizer
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", family=family, tie=False)
    vlm = VLM.from_pretrained(ckpt)
    names = lora.add_lora(vlm, rank=4, alpha=12)
    assert len(names) == 7 * vlm.config.text.num_layers
    randomize(vlm)
    vlm.eval()
    tok, nf = Tokenizer.from_pretrained(ckpt), 3  # odd: the last frame pair is padded
    ids = tok.video_prompt("What happens here?", vlm.num_video_tokens(nf), nf) + tok.response("A dog runs.")
    S = vlm.config.vision.image_size
    frames = torch.randn(nf, 3, S, S, generator=torch.Generator().manual_seed(0))
    adapter = str(tmp_path / "adapter")
    lora.save_adapter(vlm, adapter)
    with torch.no_grad():
        ours = vlm(torch.tensor([ids]), pixel_values_videos=frames[None])
        with lora.adapters_disabled(vlm):
            base = vlm(torch.tensor([ids]), pixel_values_videos=frames[None])
        ref = PeftModel.from_pretrained(hf_load(ckpt), adapter).eval()(**hf_inputs(vlm, ids, frames)).logits
    assert (ours - base).abs().max() > 0.1, "a random B must change the logits"
    # the Qwen parity bound (issue 17; tests/test_model_qwen3.py): without the adapter ours and transformers differ
    # by 5e-6 (Qwen2.5-VL) / 2e-6 (Qwen3-VL) here at |logits| ~5, with it 1.4e-5 / 6e-6; a wrong adapter moves > 0.1
    assert_close(ref, ours, f"{family}: PEFT + transformers vs ours with the adapter", atol=1e-4)


def test_we_load_an_adapter_peft_made(ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaOnevisionForConditionalGeneration
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                        modules_to_save=["multi_modal_projector"], init_lora_weights=False)  # random B
    peft_model = get_peft_model(hf, config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    vlm = lora.load_adapter(VLM.from_pretrained(ckpt), str(tmp_path / "peft")).eval()
    assert any(n.startswith("vision_tower.") for n in vlm.lora["targets"]), "PEFT's suffix match hits SigLIP too"
    ids, pixels = inputs(vlm)
    with torch.no_grad():
        assert_close(vlm(ids, pixels), peft_model(input_ids=ids, pixel_values_videos=pixels).logits,
                     "ours with PEFT's adapter vs PEFT")


def test_merged_checkpoint_equals_adapter(ckpt, tmp_path):
    vlm = VLM.from_pretrained(ckpt)
    lora.add_lora(vlm, rank=4, alpha=8)
    randomize(vlm)
    vlm.eval()
    ids, pixels = inputs(vlm)
    with torch.no_grad():
        ours = vlm(ids, pixels)
    state = lora.merged_state(vlm.state_dict(), vlm.lora)  # what dpo.py exports, FSDP's gathered dict included
    with torch.device("meta"):
        shell = VLM(vlm.config)
    shell.load_state_dict(state, assign=True)
    shell.source_dir = ckpt
    shell.save_pretrained(str(tmp_path / "merged"))
    assert_close(hf_logits(str(tmp_path / "merged"), ids, pixels), ours, "transformers on the merged checkpoint",
                 MERGED_ATOL)
    with torch.no_grad():
        assert_close(lora.merge_lora(vlm)(ids, pixels), ours, "merge_lora in place", MERGED_ATOL)
    assert not hasattr(vlm, "lora") and not any(".lora_" in k for k in vlm.state_dict())


def test_frozen_bf16_is_exact_under_autocast(ckpt):
    ref, low = VLM.from_pretrained(ckpt), VLM.from_pretrained(ckpt)
    lora.add_lora(ref, rank=4, alpha=8)
    lora.add_lora(low, rank=4, alpha=8, frozen_dtype=torch.bfloat16)
    for m in (ref, low):
        randomize(m)
        m.eval()
    assert low.language_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids, pixels = inputs(ref)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(ids, pixels), ref(ids, pixels))

# -----------------------------------------------------------------------------
# LoRA DPO (dpo.py with lora_rank > 0) on test_dpo's tiny checkpoint, videos and pairs

from test_dpo import REPO, cli, config, data, kill_tree, metrics, run_script, wait_for  # noqa: E402,F401

LORA = dict(lora_rank=8, lora_alpha=16.0, learning_rate=1e-3, min_lr_ratio=1.0)
LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "ref", "merge", "min_lr_ratio")


def lora_cli(cfg):
    return cli(cfg) + [f"--{k}={cfg[k]}" for k in LORA_KEYS]


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_lora_dpo_learns_and_exports(data, tmp_path):
    cfg = config(data, tmp_path / "run", max_iters=12, batch_size=3, ref="live", save_interval=6, **LORA)
    summary = dpo.train(cfg)
    assert summary["status"] == "done"
    m = metrics(cfg["out_dir"])
    print("LoRA DPO:", [(r["loss"], r["rewards_accuracy"], r["rewards_margin"]) for r in m])
    assert m[0]["rewards_margin"] == 0.0 and m[0]["rewards_chosen"] == 0.0, "B = 0: policy == reference, exactly"
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6  # -log sigmoid(0)
    assert sum(r["rewards_accuracy"] for r in m[-3:]) / 3 >= 0.9, [r["rewards_accuracy"] for r in m]
    assert m[-1]["rewards_margin"] > 1.0 and m[-1]["loss"] < 0.5 * m[0]["loss"], [r["loss"] for r in m]
    # a checkpoint holds the adapter (PEFT format) + optimizer + RNG, no model weights
    out = cfg["out_dir"]
    assert sorted(os.listdir(os.path.join(out, "ckpt-6"))) == ["adapter_config.json", "adapter_model.safetensors",
                                                               "optim", "rng-rank0.pt", "train_state.json"]
    print(f"ckpt-6: {dir_bytes(os.path.join(out, 'ckpt-6'))} bytes; base checkpoint: {dir_bytes(data['ckpt'])} bytes")
    # final_adapter/ in PEFT on transformers == ours with the adapter; final/ (merged) in transformers == the same
    vlm = lora.load_adapter(VLM.from_pretrained(data["ckpt"]), os.path.join(out, "final_adapter")).eval()
    ids, pixels = inputs(vlm)
    with torch.no_grad():
        ours = vlm(ids, pixels)
    assert_close(hf_logits(data["ckpt"], ids, pixels, os.path.join(out, "final_adapter")), ours,
                 "PEFT + transformers on final_adapter/ vs ours")
    assert_close(hf_logits(os.path.join(out, "final"), ids, pixels), ours, "transformers on final/ vs ours",
                 MERGED_ATOL)
    assert os.path.isfile(os.path.join(out, "final", "tokenizer.json"))
    # bench.py --adapter on the base model answers as bench.py on the merged final/ does
    import bench
    items = [dict(id=f"q{k}", video=f"v{k}.mp4", query="What happens?") for k in range(3)]
    answers = []
    for model, adapter in ((data["ckpt"], os.path.join(out, "final_adapter")), (os.path.join(out, "final"), "")):
        run = dict(bench.DEFAULTS, model=model, adapter=adapter, video_root=data["videos"], num_frames=2,
                   max_new_tokens=8, batch_size=3, decode_workers=0, device="cpu", progress=False)
        path = str(tmp_path / f"answers{len(answers)}.jsonl")
        bench.generate_answers(items, run, path, path + ".errors")
        answers.append([json.loads(line)["answer"] for line in open(path)])
    assert answers[0] == answers[1] and any(answers[0]), answers
    # the precomputed reference gives the same first steps as the live one (adapters off)
    pre = config(data, tmp_path / "pre", max_iters=3, batch_size=3, ref="precompute", **LORA)
    dpo.train(pre)
    for a, b in zip(m[:3], metrics(pre["out_dir"]), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards_margin"] - b["rewards_margin"]) < 1e-5, (a, b)


def adapter_tensors(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_lora_kill_and_resume_equals_uninterrupted(data, tmp_path):
    # kill -9 once ckpt-2 is complete (a state, not a time), resume: losses and the final adapter equal a straight run
    base = config(data, tmp_path / "straight", max_iters=6, batch_size=2, gradient_accumulation_steps=2,
                  save_interval=2, keep_checkpoints=20, lora_dropout=0.1, merge=False, ref="live", **LORA)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs below (OMP_NUM_THREADS=1): CPU kernels' rounding depends on threads
    try:
        dpo.train(base)
    finally:
        torch.set_num_threads(threads)
    assert not os.path.isdir(os.path.join(base["out_dir"], "final")), "merge=False writes final_adapter/ only"
    cfg = dict(base, out_dir=str(tmp_path / "killed"))
    proc = run_script(lora_cli(cfg))
    landed = wait_for(os.path.join(cfg["out_dir"], "ckpt-2", "train_state.json"), proc)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    assert landed and not os.path.isdir(os.path.join(cfg["out_dir"], "final_adapter")), "the kill missed\n" + log
    proc = run_script(lora_cli(cfg))
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "resuming from" in log, log
    a, b = metrics(base["out_dir"]), metrics(cfg["out_dir"])
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["rewards_margin"] - y["rewards_margin"]) < 1e-6, (x, y)
    assert a[-1]["rewards_margin"] > a[0]["rewards_margin"]
    sa, sb = (adapter_tensors(os.path.join(d, "final_adapter")) for d in (base["out_dir"], cfg["out_dir"]))
    assert sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6) for k in sa)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_lora_torchrun_two_gloo_processes_match_one(data, tmp_path, mode):
    # 2 ranks x 1 pair = one process with 2 pairs; the adapters end equal (DDP: identical replicas, checked by dpo)
    one = config(data, tmp_path / "one", max_iters=3, batch_size=2, ref="live", **LORA)
    dpo.train(one)
    two = dict(one, out_dir=str(tmp_path / mode), batch_size=1)
    if mode == "fsdp":
        two.update(fsdp=True, activation_checkpointing=True, save_interval=2)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "dpo.py"), *lora_cli(two)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if mode == "ddp":
        assert "weights identical on 2 ranks" in proc.stdout
    else:
        assert os.path.isfile(os.path.join(two["out_dir"], "ckpt-2", "adapter_model.safetensors"))
    close = lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(a))  # noqa: E731  (as test_dpo: other batch shapes)
    for x, y in zip(metrics(one["out_dir"]), metrics(two["out_dir"]), strict=True):
        assert close(x["loss"], y["loss"]) and close(x["rewards_margin"], y["rewards_margin"]), (x, y)
    sa, sb = (adapter_tensors(os.path.join(d, "final_adapter")) for d in (one["out_dir"], two["out_dir"]))
    worst = max(((sa[k] - sb[k]).norm() / sa[k].norm().clamp(min=1e-12)).item() for k in sa)
    assert sa.keys() == sb.keys() and worst < 1e-3, worst


def test_trainable_state_at_rank_16_is_under_2_percent_of_full_fine_tuning(ckpt):
    from bench_lora import SHAPES, count
    lm, total, trained = count(SHAPES["tiny (tests)"], 16)  # the meta-device count equals a real model's
    real = VLM.from_pretrained(ckpt)
    assert total == sum(p.numel() for p in real.parameters()) - real.language_model.lm_head.weight.numel()  # untied
    lora.add_lora(real, rank=16, alpha=32)
    assert trained == sum(p.numel() for p in real.parameters() if p.requires_grad)
    for name in ("llava-onevision-7b", "llava-next-video-7b"):
        lm, total, trained = count(SHAPES[name], 16)
        assert 7e9 < total < 8.1e9 and trained / lm <= 0.02, (name, total, trained / lm)
