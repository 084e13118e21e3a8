"""
dpo.plan (the memory planner, `python dpo.py config/llava.py --plan=True`) against memory measured on CPU in one real
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
# here so the example needs no download; vocab 152064 is the padded embedding size of the hub checkpoint.
OV7B = {"model_type": "llava_onevision", "video_token_index": 151647, "image_token_index": 151646,
        "tie_word_embeddings": False, "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
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
               logits=max(b.nbytes for b in buffers), response_tokens=len(batch["targets"]), layer=max(per_layer.values()))
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
    planned = dpo.plan(cfg)
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
    assert planned["weight_copies"] == 0  # fp32 on CPU: no autocast copies, no FSDP
    assert planned["reference"] == measured.get("reference", 0)
    assert planned["activations_checkpointed"] < planned["activations"]
