"""
dpo.memory_plan (`python dpo.py config/llava.py --plan=True`) against memory measured on CPU in one real
training step of dpo's scorer on a tiny random llava_onevision checkpoint: parameters, gradients and AdamW state by
summing tensor bytes after an optimizer step; activations by summing the bytes of the tensors autograd saves in the
forward (torch.autograd.graph.saved_tensors_hooks, one count per storage, parameters excluded), with and without
activation checkpointing; the fused log-probs' logits chunk by recording its buffer. Also: the largest batch_size
that fits is monotone in gpu_memory_gb and sits exactly at the budget; the CLI prints the table without the weights;
and the plan of a LLaVA-OneVision-7B-shaped config, printed as a documented example (-s shows it).

    .venv/bin/python -m pytest -q tests/test_dpo_plan.py -s
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import dpo
import kernels
import packing
from model import VLM, init_weights, parse_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDEO_ID = 255


def tiny_config(tie=True):
    """A tiny llava_onevision config.json: 28 px frames in 7 px patches (4 tokens per frame after the resize)."""
    return {"model_type": "llava_onevision", "video_token_index": VIDEO_ID, "image_token_index": 254,
            "tie_word_embeddings": tie, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 7},
            "text_config": {"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
                            "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
                            "tie_word_embeddings": tie}}


# LLaVA-OneVision-7B's shape (llava-hf/llava-onevision-qwen2-7b-ov-hf): Qwen2-7B LM, SigLIP so400m tower. Written out
# here so the example needs no download; vocab 152064 is the padded embedding size of the hub checkpoint. SigLIP
# so400m has 27 blocks; the hub config keeps 26 (LLaVA reads the penultimate block), which gives the model card's
# 8.03B parameters (test_llava_7b_example checks that count).
OV7B = {"model_type": "llava_onevision", "video_token_index": 151647, "image_token_index": 151646,
        "tie_word_embeddings": False, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "text_config": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rope_theta": 1e6, "tie_word_embeddings": False}}


def write_checkpoint(path, raw):
    vlm = init_weights(VLM(parse_config(raw)))
    vlm.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return dict(tied=write_checkpoint(root / "tied", tiny_config(True)),
                untied=write_checkpoint(root / "untied", tiny_config(False)))


def config(ckpt, **over):
    cfg = dict(dpo.DEFAULTS, init_from=ckpt, device="cpu", dtype="float32", num_frames=2, max_len=64, batch_size=2,
               attn_impl="auto", seed=0)
    cfg.update(over)
    return cfg


def batch_for(cfg, vlm):
    """batch_size pairs of distinct videos, each row exactly max_len tokens: [t | video | t | chosen | rejected]."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 250, (n,), generator=g).tolist()  # noqa: E731 (below the special ids)
    S, items = vlm.config.vision.image_size, []
    for b in range(cfg["batch_size"]):
        prompt = ids(1) + [VIDEO_ID] * vlm.num_video_tokens(cfg["num_frames"]) + ids(1)
        n = cfg["max_len"] - len(prompt)
        items.append(dict(id=f"p{b}", video=f"v{b}.mp4", category="x", prompt_ids=prompt, chosen_ids=ids(n // 2),
                          rejected_ids=ids(n - n // 2),
                          pixels=torch.randn(cfg["num_frames"], 3, S, S, generator=g)))
    return packing.collate(items, True, 0, max_pairs=cfg["max_pairs_per_row"], max_len=cfg["max_len"])


def measure(cfg, monkeypatch, recomputed=None):
    """Bytes of one real CPU training step of dpo's scorer (build_scorer: LoRA and checkpointing as configured).
    With activation checkpointing, `recomputed` is the bytes one layer saves when rerun in backward: a layer's
    saved tensors measured without checkpointing."""
    scorer = dpo.build_scorer(cfg["init_from"], cfg, torch.device("cpu"), trainable=True)
    vlm = scorer.vlm
    params = {p.untyped_storage().data_ptr() for p in vlm.parameters()}
    saved, inputs, per_layer = {}, {}, {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def before_layer(module, args):  # checkpointing keeps each layer's input (autograd saves it too) to recompute from
        inputs[args[0].untyped_storage().data_ptr()] = args[0].untyped_storage().nbytes()
        per_layer[module] = set(saved)

    def after_layer(module, args, output):
        per_layer[module] = sum(saved[k] for k in set(saved) - per_layer[module])

    for layer in vlm.language_model.model.layers:
        layer.register_forward_pre_hook(before_layer)
        layer.register_forward_hook(after_layer)
    buffers, real_buffer = [], kernels._logits_buffer
    monkeypatch.setattr(kernels, "_logits_buffer", lambda *a: buffers.append(real_buffer(*a)) or buffers[-1])
    batch = batch_for(cfg, vlm)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chosen, rejected, _, _ = dpo.pair_logps(scorer, batch, "cpu")
    (chosen - rejected).sum().backward()
    trainable = [p for p in vlm.parameters() if p.grad is not None]  # SigLIP's post_layernorm is never used
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    optimizer.step()
    out = dict(parameters=sum(p.nbytes for p in vlm.parameters()), gradients=sum(p.grad.nbytes for p in trainable),
               optimizer=sum(v.nbytes for s in optimizer.state.values() for v in s.values()),
               logits=max(b.nbytes for b in buffers), layer=max(per_layer.values()))
    if cfg["activation_checkpointing"]:
        out["activations_checkpointed"] = sum({**saved, **inputs}.values()) + recomputed  # one count per storage
    else:
        out["activations"] = sum(saved.values())
    if cfg["ref"] == "live" and not cfg["lora_rank"]:
        ref = dpo.build_scorer(cfg["init_from"], cfg, torch.device("cpu"), trainable=False)
        out["reference"] = sum(p.nbytes for p in ref.parameters())
    return out


CASES = {
    "full fine-tuning, tied head": dict(ckpt="tied"),
    "untied head, live reference, tower and projector train": dict(ckpt="untied", ref="live", train_vision=True,
                                                                  train_projector=True),
    "LoRA rank 4, live reference (adapters off)": dict(ckpt="tied", lora_rank=4, lora_alpha=8.0, ref="live"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_matches_measured_memory(ckpts, case, monkeypatch):
    over = dict(CASES[case])
    cfg = config(ckpts[over.pop("ckpt")], **over)
    planned = dpo.memory_plan(cfg)
    off = measure(dict(cfg, activation_checkpointing=False), monkeypatch)
    on = measure(dict(cfg, activation_checkpointing=True), monkeypatch, recomputed=off["layer"])
    measured = dict(off, activations_checkpointed=on["activations_checkpointed"])
    keys = ["parameters", "gradients", "optimizer", "activations", "activations_checkpointed", "logits"]
    keys += ["reference"] if "reference" in measured else []
    for key in keys:
        print(f"{case}: {key} planned {planned[key]:,.0f} B, measured {measured[key]:,.0f} B "
              f"({planned[key] / measured[key]:.3f}x)")
    for key in keys:
        assert measured[key] > 0, key
        assert abs(planned[key] - measured[key]) <= 0.25 * measured[key], (case, key, planned[key], measured[key])
    # the per-layer formula alone, tighter: one decoder layer's saved tensors (the reference attention's masks aside)
    vlm = VLM(parse_config(json.load(open(os.path.join(cfg["init_from"], "config.json")))))
    P, T = vlm.num_video_tokens(cfg["num_frames"]), cfg["max_len"]
    layer = cfg["batch_size"] * T * dpo.layer_bytes(vlm.config.text, False, 4, 4, (T + P) / T, not cfg["lora_rank"],
                                                    cfg["lora_rank"])
    assert abs(layer - off["layer"]) <= 0.05 * off["layer"], (layer, off["layer"])
    assert planned["weight_copies"] == 0  # fp32 on CPU: no autocast copies, no FSDP
    assert planned["reference"] == measured.get("reference", 0)
    assert planned["activations_checkpointed"] < planned["activations"]


@pytest.fixture(scope="module")
def ov7b(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov7b")
    (path / "config.json").write_text(json.dumps(OV7B))
    return str(path)


def llava_config(ov7b, **over):
    """config/llava.py's run (FSDP2 over 8 GPUs, 32 frames, 8192 tokens, bf16) on the 7B shape."""
    cfg = dict(dpo.DEFAULTS)
    exec(open(os.path.join(REPO, "config", "llava.py")).read(), {}, cfg)
    cfg.update(init_from=ov7b, plan_world=8, device="auto")
    cfg.update(over)
    return cfg


def test_llava_7b_example(ov7b):
    """The documented example: what `python dpo.py config/llava.py --plan=True --plan_world=8` says for the 7B."""
    out = dpo.memory_plan(llava_config(ov7b))
    assert abs(out["parameters"] * 8 / 4 - 8.03e9) < 0.005 * 8.03e9  # fp32 over 8 shards: the model card's 8.03B
    assert out["gradients"] == out["optimizer"] / 2 < out["parameters"]  # the frozen tower has neither
    assert out["logits"] < out["logits_naive"] and out["activations_checkpointed"] < out["activations"] / 10
    lora = dpo.memory_plan(llava_config(ov7b, fsdp=False, lora_rank=16, ref="live", lora_frozen_dtype="bfloat16"))
    assert lora["reference"] == 0 and lora["gradients"] < 0.01 * out["gradients"] * 8  # adapters only
    assert lora["parameters"] < 0.55 * out["parameters"] * 8  # frozen linears in bf16


def test_largest_batch_is_monotone_and_at_the_budget(ov7b):
    budgets = [8, 16, 24, 40, 80, 141, 300]
    for over in (dict(), dict(fsdp=False, lora_rank=16, ref="live"), dict(fsdp=False, device="cpu")):
        for key in ("max_batch_size", "max_batch_size_checkpointed"):
            fits = [dpo.memory_plan(llava_config(ov7b, gpu_memory_gb=gb, **over), quiet=True)[key] for gb in budgets]
            assert fits == sorted(fits) and fits[-1] > 0, (over, key, fits)
        total_key = "total" + key.removeprefix("max_batch_size")
        for gb in budgets:
            b = dpo.memory_plan(llava_config(ov7b, gpu_memory_gb=gb, **over), quiet=True)[key]
            at = lambda n: dpo.memory_plan(llava_config(ov7b, gpu_memory_gb=gb, batch_size=n, **over), quiet=True)  # noqa
            if b > 0:
                assert at(b)[total_key] <= gb * dpo.GiB, (over, gb, b)
            assert at(b + 1)[total_key] > gb * dpo.GiB, (over, gb, b)
    # per sample: activations grow by the same amount for every added pair; the logits chunk is capped
    a = [dpo.memory_plan(llava_config(ov7b, batch_size=n), quiet=True) for n in (1, 2, 3, 8)]
    step = a[1]["activations"] - a[0]["activations"]
    assert step > 0 and a[2]["activations"] - a[1]["activations"] == step
    assert a[3]["activations"] == a[0]["activations"] + 7 * step
    assert a[3]["logits"] <= 2 ** 28 * 1.5 and a[3]["response_tokens"] == 8 * a[0]["response_tokens"]


def test_cli_plan_reads_no_weights(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", tiny_config())
    os.remove(os.path.join(ckpt, "model.safetensors"))  # the plan must not need the weights
    out_dir = tmp_path / "out"
    args = [sys.executable, os.path.join(REPO, "dpo.py"), f"--init_from={ckpt}", "--plan=True", "--device=cpu",
            "--num_frames=2", "--max_len=64", f"--out_dir={out_dir}", "--gpu_memory_gb=0.001"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "memory plan per GPU" in r.stdout and "AdamW m + v" in r.stdout and "largest batch_size" in r.stdout
    assert not out_dir.exists()  # nothing written: no config.json, no summary
    r = subprocess.run(args[:2] + ["--init_from=llava-hf/llava-onevision-qwen2-7b-ov-hf", "--plan=True"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "config.json" in r.stderr and "hub id" in r.stderr, r.stderr
