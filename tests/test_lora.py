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

import pytest
import torch

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
        assert canonical_name(lora.hf_name(key)) == key, key
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
    torch.manual_seed(0)  # A is drawn from the global RNG: the same A for both
    lora.add_lora(ref, rank=4, alpha=8)
    torch.manual_seed(0)
    lora.add_lora(low, rank=4, alpha=8, frozen_dtype=torch.bfloat16)
    for m in (ref, low):
        randomize(m)
        m.eval()
    assert low.language_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids, pixels = inputs(ref)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(ids, pixels), ref(ids, pixels))
