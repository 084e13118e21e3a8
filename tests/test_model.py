"""model.py against transformers (the oracle) on tiny random checkpoints, fp32, every position.

Covers: logits of both families (odd SigLIP grid pooled with a ceiling, GQA and MHA, tied and untied heads, linear
RoPE scaling, batch 2, 4 frames); the selected vision state, pooled video features and merged embeddings; all three
key layouts and a sharded checkpoint; KV-cache generate vs full-forward argmax and left padding vs rows alone;
save_pretrained round trips; clear errors for bad checkpoints.
Run: .venv/bin/python -m pytest -q tests/test_model.py
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import VLM, canonical_name, stored_dtype
from tests.tiny import hf_config, hf_model

ATOL = 1e-5  # fp32 logits of magnitude ~10; observed differences are ~1e-6 (SDPA vs our attention, op order)
NUM_FRAMES = 4


def inputs(model, batch=2, seed=0):
    """input_ids (5 text, the expanded video, 9 text) and pixel_values_videos (B, F, 3, S, S) ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    n_video = model.num_video_tokens(NUM_FRAMES)
    text = torch.randint(0, 200, (batch, 14), generator=g)
    ids = torch.cat([text[:, :5], torch.full((batch, n_video), c.video_token_id), text[:, 5:]], dim=1)
    pixels = torch.randn(batch, NUM_FRAMES, 3, c.vision.image_size, c.vision.image_size, generator=g)
    return ids, pixels


def assert_close(ours, ref, what, atol=ATOL):
    diff = (ours.float() - ref.float()).abs().max().item()
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert diff <= atol, f"{what}: max |Δ| = {diff:.3g} > {atol}"


def write_checkpoint(tmp_path, family="llava_onevision", **kw):
    path = str(tmp_path / "hf")
    hf = hf_model(hf_config(family, **kw))
    hf.save_pretrained(path)
    return hf, path


CASES = [
    dict(family="llava_onevision", tie=True, kv_heads=2),  # 0.5B-like: tied head, GQA 4:1
    dict(family="llava_onevision", tie=False, kv_heads=4),  # 7B-like: own head, GQA 2:1
    dict(family="llava_next_video", tie=False, kv_heads=8, rope_scaling=2.0),  # MHA, linear RoPE 2.0
    dict(family="llava_next_video", tie=False, kv_heads=2, rope_scaling=2.5),  # GQA, linear RoPE 2.5
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logits_match_transformers(tmp_path, case):
    hf, path = write_checkpoint(tmp_path, **case)
    ours = VLM.from_pretrained(path)
    ids, pixels = inputs(ours)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=pixels).logits
        logits = ours(ids, pixels)
    assert ref.abs().max() > 1.0, "logits too small to reveal a bug: re-initialisation failed"
    assert_close(logits, ref, "logits")
    # the intermediate tensors, so a failure points at the stage that broke
    c = ours.config
    with torch.no_grad():
        flat = pixels.flatten(0, 1)
        hf_states = hf.model.vision_tower(flat, output_hidden_states=True).hidden_states
        assert_close(ours.vision_tower.vision_model(flat, c.feature_layers), hf_states[c.feature_layers[0]],
                     "selected vision hidden state")
        pooled = hf.model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=c.feature_layers[0],
                                             vision_feature_select_strategy=c.select_strategy).pooler_output
        assert_close(ours.video_features(pixels), pooled.reshape(ours.video_features(pixels).shape),
                     "pooled video features")
        seen = {}
        handle = hf.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True)
        hf(input_ids=ids, pixel_values_videos=pixels)
        handle.remove()
        assert_close(ours.embed(ids, pixels), seen["embeds"], "merged embeddings")


def rewrite(src, dst, rename, shards=1):
    """Copy checkpoint `src` to `dst` with every tensor name passed through `rename`, split into `shards` files."""
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = {rename(k): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(dst, "model.safetensors"))
        return
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, os.path.join(dst, fname))
        weight_map.update({k: fname for k in part})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def to_hub_4x(key):  # our canonical names are the 4.x hub layout
    return canonical_name(key)


def to_452(key):  # model.language_model.*, lm_head.*, model.vision_tower.vision_model.*, model.<projector|newline>
    key = canonical_name(key)
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key.startswith("language_model.lm_head."):
        return key[len("language_model."):]
    return "model." + key


@pytest.mark.parametrize("layout,shards", [("hub4x", 1), ("v452", 1), ("hub4x", 3)])
def test_key_layouts_and_shards(tmp_path, layout, shards):
    hf, path = write_checkpoint(tmp_path, tie=False)
    stored = load_file(os.path.join(path, "model.safetensors"))
    # transformers 5 writes the third layout: vision tower without `vision_model.`
    assert any(k.startswith("vision_tower.embeddings.") for k in stored), sorted(stored)[:5]
    dst = str(tmp_path / f"{layout}-{shards}")
    rewrite(path, dst, to_hub_4x if layout == "hub4x" else to_452, shards)
    reference = VLM.from_pretrained(path)
    ours = VLM.from_pretrained(dst)
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    ids, pixels = inputs(ours, batch=1)
    with torch.no_grad():
        assert_close(ours(ids, pixels), hf(input_ids=ids, pixel_values_videos=pixels).logits, "logits")


def greedy_by_full_forward(model, ids, pixels, steps):
    feats = model.video_features(pixels)
    ids = ids.clone()
    out = []
    for _ in range(steps):
        nxt = model(ids, video_features=feats)[:, -1].argmax(-1)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return out


def test_generate_kv_cache_and_left_padding(tmp_path):
    _, path = write_checkpoint(tmp_path, tie=True)
    model = VLM.from_pretrained(path)
    ids, pixels = inputs(model, batch=2)
    short = ids[1, 3:]  # a shorter second prompt: left-padded in the batch
    with torch.no_grad():
        expected = [greedy_by_full_forward(model, ids[:1], pixels[:1], 10),
                    greedy_by_full_forward(model, short[None], pixels[1:], 10)]
        batch = model.generate([ids[0].tolist(), short.tolist()], pixels, max_new_tokens=10)
        alone = [model.generate([ids[0].tolist()], pixels[:1], max_new_tokens=10)[0],
                 model.generate([short.tolist()], pixels[1:], max_new_tokens=10)[0]]
    assert alone == expected, "KV-cache greedy differs from full-forward argmax"
    assert batch == expected, "a left-padded batch differs from each row run alone"
    # stop tokens end a row and are not returned
    stop = expected[0][3]
    stopped = model.generate([ids[0].tolist()], pixels[:1], max_new_tokens=10, stop_ids=(stop,))[0]
    assert stopped == expected[0][:expected[0].index(stop)]


def test_sampling(tmp_path):
    _, path = write_checkpoint(tmp_path, tie=True)
    model = VLM.from_pretrained(path)
    ids, pixels = inputs(model, batch=1)
    prompt = [ids[0].tolist()]
    greedy = model.generate(prompt, pixels, max_new_tokens=6)
    a = model.generate(prompt, pixels, max_new_tokens=6, temperature=1.0, seed=3)
    b = model.generate(prompt, pixels, max_new_tokens=6, temperature=1.0, seed=3)
    assert a == b, "sampling with a seed is not reproducible"
    # a nucleus this small holds only the most likely token: sampling collapses to greedy
    assert model.generate(prompt, pixels, max_new_tokens=6, temperature=1.0, top_p=1e-6, seed=5) == greedy
    samples = {tuple(model.generate(prompt, pixels, max_new_tokens=6, temperature=5.0, seed=s)[0]) for s in range(4)}
    assert len(samples) > 1, "high-temperature samples never differ"


def test_save_pretrained_round_trip(tmp_path):
    hf, path = write_checkpoint(tmp_path, tie=True)
    ours = VLM.from_pretrained(path)
    out = str(tmp_path / "saved")
    ours.save_pretrained(out, max_shard_bytes=200_000)  # force a sharded save
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    back = VLM.from_pretrained(out)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed in the round trip"
    from transformers import LlavaOnevisionForConditionalGeneration
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = inputs(ours, batch=1)
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids, pixel_values_videos=pixels).logits,
                     hf(input_ids=ids, pixel_values_videos=pixels).logits, "transformers on our save", atol=0)
    ours.save_pretrained(out)  # overwriting an existing dir works and leaves no temporaries
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or ".old" in p]
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_bad_checkpoints(tmp_path):
    _, path = write_checkpoint(tmp_path, tie=False)
    with pytest.raises(ValueError, match="no config.json"):
        VLM.from_pretrained(str(tmp_path))

    def variant(name, edit_config=None, edit_tensors=None):
        dst = str(tmp_path / name)
        shutil.copytree(path, dst)
        if edit_config:
            with open(os.path.join(dst, "config.json")) as f:
                raw = json.load(f)
            edit_config(raw)
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump(raw, f)
        if edit_tensors:
            tensors = load_file(os.path.join(dst, "model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, os.path.join(dst, "model.safetensors"))
        return dst

    with pytest.raises(ValueError, match="model_type 'llava'.*supported: llava_onevision"):
        VLM.from_pretrained(variant("type", edit_config=lambda r: r.update(model_type="llava")))
    with pytest.raises(ValueError, match="missing tensors.*layers.1.mlp.up_proj.weight"):
        VLM.from_pretrained(variant("missing", edit_tensors=lambda t: t.pop(
            "language_model.model.layers.1.mlp.up_proj.weight")))
    with pytest.raises(ValueError, match="unexpected tensors.*extra.weight"):
        VLM.from_pretrained(variant("extra", edit_tensors=lambda t: t.update({"extra.weight": torch.zeros(2)})))
    with pytest.raises(ValueError, match="multi_modal_projector.linear_2.bias.*shape \\(3,\\), expected \\(64,\\)"):
        VLM.from_pretrained(variant("shape", edit_tensors=lambda t: t.update(
            {"multi_modal_projector.linear_2.bias": torch.zeros(3)})))
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    shutil.copy(os.path.join(path, "config.json"), empty)
    with pytest.raises(ValueError, match="no model.safetensors"):
        VLM.from_pretrained(empty)
    sharded = str(tmp_path / "sharded")
    rewrite(path, sharded, canonical_name, shards=2)
    os.remove(os.path.join(sharded, "model-00002-of-00002.safetensors"))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors.*missing"):
        VLM.from_pretrained(sharded)


def test_demo_checkpoint_loads_in_transformers(tmp_path):
    """A model we initialise ourselves (the demo's base, config written by data/demo/pretrain.py) is a real HF
    checkpoint: transformers loads it and gives our logits."""
    from data.demo.pretrain import tiny_config
    from model import init_weights, parse_config
    from transformers import LlavaOnevisionForConditionalGeneration
    path = str(tmp_path / "demo")
    init_weights(VLM(parse_config(tiny_config(1029, 1027, 1028))), seed=0).save_pretrained(path)
    ours = VLM.from_pretrained(path)
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(path).eval()
    ids, pixels = inputs(ours, batch=2)
    with torch.no_grad():
        assert_close(ours(ids, pixels), hf(input_ids=ids, pixel_values_videos=pixels).logits, "logits")


def test_prefix_shared_pair_equals_two_rows(tmp_path):
    """One row [prompt+video | chosen | rejected] with layout [P, C, R] and the rejected positions restarting at P
    gives the logits of [prompt|chosen] and [prompt|rejected] run separately; a right-padded row [n, 0, 0] gives the
    logits of the unpadded row."""
    _, path = write_checkpoint(tmp_path, tie=True)
    model = VLM.from_pretrained(path)
    ids, pixels = inputs(model, batch=1)
    prompt, chosen, rejected = ids[0], torch.tensor([7, 8, 9, 10, 11]), torch.tensor([12, 13, 14])
    P, C, R = len(prompt), len(chosen), len(rejected)
    pad = 4
    row = torch.cat([prompt, chosen, rejected, torch.zeros(pad, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(P + C), torch.arange(P, P + R), torch.zeros(pad, dtype=torch.long)])[None]
    with torch.no_grad():
        feats = model.video_features(pixels)
        shared = model(row, video_features=feats, position_ids=positions, layout=torch.tensor([[P, C, R]]))[0]
        a = model(torch.cat([prompt, chosen])[None], video_features=feats)[0]
        b = model(torch.cat([prompt, rejected])[None], video_features=feats)[0]
        padded = model(row, video_features=feats, layout=torch.tensor([[P + C + R, 0, 0]]))[0]
        plain = model(row[:, :P + C + R], video_features=feats)[0]
    assert_close(shared[:P + C], a, "prompt + chosen branch")
    assert_close(shared[P + C:P + C + R], b[P:], "rejected branch")
    assert_close(padded[:P + C + R], plain, "right-padded row")
    assert torch.isfinite(shared).all() and torch.isfinite(padded).all()


def test_attn_impl_switch_and_export_dtype(tmp_path):
    """attn_impl="sdpa" is accepted everywhere (on CPU it is the same reference path: identical logits); a bad value
    names the choices. save_pretrained(dtype=bf16) writes bf16 tensors and config dtype, which transformers loads to
    the same logits as our loader, and within bf16 rounding of the fp32 model."""
    from safetensors import safe_open
    from transformers import LlavaOnevisionForConditionalGeneration
    hf, path = write_checkpoint(tmp_path, tie=False)
    ours, sdpa = VLM.from_pretrained(path), VLM.from_pretrained(path, attn_impl="sdpa")
    ids, pixels = inputs(ours, batch=1)
    with torch.no_grad():
        full = ours(ids, pixels)
        assert_close(sdpa(ids, pixels), full, "attn_impl=sdpa", atol=0)
    with pytest.raises(ValueError, match="attn_impl 'flash' is not one of auto, triton, sdpa"):
        VLM.from_pretrained(path, attn_impl="flash")
    out = str(tmp_path / "bf16")
    ours.save_pretrained(out, dtype=torch.bfloat16)
    with open(os.path.join(out, "config.json")) as f:
        assert stored_dtype(json.load(f)) == torch.bfloat16
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    back = VLM.from_pretrained(out)  # read in fp32, values bf16-rounded
    reloaded = LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        mine = back(ids, pixels)
        assert_close(reloaded(input_ids=ids, pixel_values_videos=pixels).logits, mine, "transformers on a bf16 save")
        scale = full.abs().max().item()
        assert_close(mine, full, "bf16 export vs the fp32 model", atol=0.02 * scale)  # bf16: 8 mantissa bits
    assert stored_dtype({}) == torch.float32 and stored_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
