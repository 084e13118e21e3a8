"""model.py's Qwen2.5-VL against transformers (the oracle) on a tiny random checkpoint, fp32, every position.

Covers: logits for a batch of 2 videos with different non-square grids (odd frame count padded to the temporal
patch, several windows with smaller edge windows, full-attention blocks, GQA) and different second_per_grid_ts;
the vision features and the 3-D position ids separately; tied and untied heads; the 4.x hub layout (what
transformers 5 writes too), the in-memory 5.x layout, sharded; KV-cache greedy = transformers' greedy generate =
full-forward argmax; the fixed-size frames path (B, F, 3, S, S) and prefix-shared pairs on 3-D positions;
save_pretrained read back by transformers with identical logits.
Run: .venv/bin/python -m pytest -q tests/test_model_qwen.py
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import VLM, parse_config, patchify

ATOL = 1e-5  # fp32 logits of magnitude ~10; differences come from op order (SDPA per window vs per segment)
VIDEO, IMAGE = 299, 298
# two videos: 5 frames (padded to 6) of 140x84 px and 4 frames of 84x112 px -> grids (3, 10, 6) and (2, 6, 8)
GRIDS = [(5, 140, 84), (4, 84, 112)]
SECONDS = [1.0, 0.75]  # seconds per frame pair: temporal steps 2.0 and 1.5 at tokens_per_second 2


def hf_config(tie=False):
    from transformers import Qwen2_5_VLConfig
    vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[1, 3], window_size=56, tokens_per_second=2)  # windows of 2x2 merged blocks
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]),
                tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, video_token_id=VIDEO, image_token_id=IMAGE,
                            vision_start_token_id=297, vision_end_token_id=296, tie_word_embeddings=tie)


def hf_model(tie=False, seed=0):
    """Re-initialised at a visible scale (tests/tiny.hf_model): the default init hides bugs."""
    from tests.tiny import hf_model as visible
    return visible(hf_config(tie), seed)


def write_checkpoint(tmp_path, tie=False):
    path = str(tmp_path / "hf")
    hf = hf_model(tie)
    hf.save_pretrained(path)
    return hf, path


def vision_config():
    return parse_config(hf_config().to_dict()).vision


def inputs(batch=2, seed=0):
    """input_ids (text, the expanded video, text; rows of equal length), the processor's flattened patches,
    video_grid_thw, second_per_grid_ts and mm_token_type_ids (what transformers needs to build 3-D positions)."""
    g = torch.Generator().manual_seed(seed)
    rows, patches, grids = [], [], []
    for i, (nf, h, w) in enumerate(GRIDS[:batch]):
        x, grid = patchify(torch.randn(1, nf, 3, h, w, generator=g), vision_config())
        n = int(grid.prod()) // 4
        before = 5 + 2 * i
        text = torch.randint(0, 290, (70 - n,), generator=g)
        rows.append(torch.cat([text[:before], torch.full((n,), VIDEO), text[before:]]))
        patches.append(x[0])
        grids.append(grid)
    ids = torch.stack(rows)
    return (ids, torch.cat(patches), torch.cat(grids), torch.tensor(SECONDS[:batch]),
            (ids == VIDEO).int() * 2)


def assert_close(ours, ref, what, atol=ATOL):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"{what}: max |Δ| = {diff:.3g} > {atol}"


def hf_logits(hf, ids, patches, grid, seconds, types):
    return hf(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid, second_per_grid_ts=seconds,
              mm_token_type_ids=types).logits


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tmp_path, tie):
    hf, path = write_checkpoint(tmp_path, tie)
    ours = VLM.from_pretrained(path)
    ids, patches, grid, seconds, types = inputs()
    with torch.no_grad():
        ref = hf_logits(hf, ids, patches, grid, seconds, types)
        logits = ours(ids, pixel_values_videos=patches, video_grid_thw=grid, second_per_grid_ts=seconds)
        # the stages separately, so a failure points at the one that broke
        feats = torch.cat(hf.model.get_video_features(patches, grid).pooler_output)
        assert_close(ours.video_features(patches, grid), feats, "video features (tower + merger)")
        hf.model.rope_deltas = None
        pos, _ = hf.model.get_rope_index(ids, video_grid_thw=grid, second_per_grid_ts=seconds,
                                         mm_token_type_ids=types)
        ours_pos = ours.mrope_positions(ids, torch.arange(ids.shape[1])[None], grid, seconds)
        assert torch.equal(ours_pos, pos), "3-D position ids differ"
    assert ref.abs().max() > 1.0, "logits too small to reveal a bug: re-initialisation failed"
    assert_close(logits, ref, "logits")
    print(f"qwen2_5_vl tie={tie}: max |Δ| logits {(logits - ref).abs().max().item():.2e}")


def to_v5(key):  # transformers 5's in-memory names: model.visual.*, model.language_model.*, lm_head.*
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


@pytest.mark.parametrize("layout,shards", [("v5", 1), ("v5", 3), ("hub4x", 2)])
def test_key_layouts_and_shards(tmp_path, layout, shards):
    hf, path = write_checkpoint(tmp_path)
    stored = load_file(os.path.join(path, "model.safetensors"))
    assert any(k.startswith("visual.blocks.") for k in stored), sorted(stored)[:5]  # transformers 5 writes 4.x names
    dst = str(tmp_path / layout)
    os.makedirs(dst)
    shutil.copy(os.path.join(path, "config.json"), dst)
    tensors = {(to_v5(k) if layout == "v5" else k): v for k, v in stored.items()}
    names, weight_map = sorted(tensors), {}
    for i in range(shards):
        fname = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::shards]}, os.path.join(dst, fname))
        weight_map.update({k: fname for k in names[i::shards]})
    if shards > 1:
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    reference, ours = VLM.from_pretrained(path), VLM.from_pretrained(dst)
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    ids, patches, grid, seconds, types = inputs(batch=1)
    with torch.no_grad():
        assert_close(ours(ids, pixel_values_videos=patches, video_grid_thw=grid, second_per_grid_ts=seconds),
                     hf_logits(hf, ids, patches, grid, seconds, types), "logits")


@pytest.mark.parametrize("seconds_per_pair", [1.0, 3.0])
def test_generate_matches_transformers_and_full_forward(tmp_path, seconds_per_pair):
    """3.0 s per frame pair puts the video's last temporal position (start + 12) past the text after it
    (start + 5): transformers then restarts generated tokens at the largest position + 1, and so do we."""
    hf, path = write_checkpoint(tmp_path, tie=True)
    ours = VLM.from_pretrained(path)
    ids, patches, grid, _, types = inputs(batch=1)
    seconds = torch.tensor([seconds_per_pair])
    steps = 8
    with torch.no_grad():
        new = ours.generate([ids[0].tolist()], pixel_values_videos=patches, video_grid_thw=grid,
                            second_per_grid_ts=seconds, max_new_tokens=steps)[0]
        ref = hf.generate(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid, second_per_grid_ts=seconds,
                          mm_token_type_ids=types, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                          min_new_tokens=steps, do_sample=False)[0, ids.shape[1]:].tolist()
        # full forward, one token at a time: the positions after the prompt continue from its largest + 1
        feats, row, full = ours.video_features(patches, grid), ids, []
        for _ in range(steps):
            full.append(int(ours(row, video_features=feats, video_grid_thw=grid,
                                 second_per_grid_ts=seconds)[0, -1].argmax()))
            row = torch.cat([row, torch.tensor([[full[-1]]])], dim=1)
    assert new == ref, f"KV-cache greedy {new} != transformers {ref}"
    # transformers puts generated tokens at max + 1 (its rope delta), a full forward at text-after-video + k:
    # the two agree only while the video's temporal positions stay below the text's
    if seconds_per_pair == 1.0:
        assert new == full, f"KV-cache greedy {new} != full-forward argmax {full}"


def test_batched_generate_left_padding(tmp_path):
    _, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    ids, patches, grid, seconds, _ = inputs(batch=2)
    short = ids[1, 3:].tolist()  # drop three text ids before the video: the row is left-padded in the batch
    split = int(grid[0].prod())
    with torch.no_grad():
        batch = ours.generate([ids[0].tolist(), short], pixel_values_videos=patches, video_grid_thw=grid,
                              second_per_grid_ts=seconds, max_new_tokens=6)
        alone = [ours.generate([ids[0].tolist()], pixel_values_videos=patches[:split], video_grid_thw=grid[:1],
                               second_per_grid_ts=seconds[:1], max_new_tokens=6)[0],
                 ours.generate([short], pixel_values_videos=patches[split:], video_grid_thw=grid[1:],
                               second_per_grid_ts=seconds[1:], max_new_tokens=6)[0]]
    assert batch == alone, "a left-padded batch differs from each row run alone"


def test_frames_path_and_prefix_shared_pair(tmp_path):
    """(B, F, 3, S, S) frames give the patches' logits; a packed [prompt+video | chosen | rejected] row with 2-D
    positions restarting at P gives the logits of the two rows run separately (3-D positions derived inside)."""
    _, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    ours.config.vision.image_size = 56  # 2x2 merged blocks per frame pair
    frames = torch.randn(1, 3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    n = ours.num_video_tokens(3)
    assert n == 8
    prompt = torch.cat([torch.tensor([1, 2, 3]), torch.full((n,), VIDEO), torch.tensor([4, 5])])
    chosen, rejected = torch.tensor([7, 8, 9, 10]), torch.tensor([12, 13, 14])
    P, C, R = len(prompt), len(chosen), len(rejected)
    row = torch.cat([prompt, chosen, rejected])[None]
    positions = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])[None]
    with torch.no_grad():
        patches, grid = patchify(frames, ours.config.vision)
        by_frames = ours(torch.cat([prompt, chosen])[None], pixel_values_videos=frames)
        by_patches = ours(torch.cat([prompt, chosen])[None], pixel_values_videos=patches[0], video_grid_thw=grid)
        feats = ours.video_features(frames)
        assert feats.shape == (1, n, 64)
        shared = ours(row, video_features=feats, position_ids=positions, layout=torch.tensor([[P, C, R]]))[0]
        b = ours(torch.cat([prompt, rejected])[None], video_features=feats)[0]
    assert torch.equal(by_frames, by_patches)
    assert_close(shared[:P + C], by_frames[0], "prompt + chosen branch")
    assert_close(shared[P + C:], b[P:], "rejected branch")


def test_save_pretrained_round_trip(tmp_path):
    hf, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    out = str(tmp_path / "saved")
    ours.save_pretrained(out, max_shard_bytes=100_000)  # force a sharded save
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    back = VLM.from_pretrained(out)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed in the round trip"
    from transformers import Qwen2_5_VLForConditionalGeneration
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    ids, patches, grid, seconds, types = inputs()
    with torch.no_grad():
        assert_close(hf_logits(reloaded, ids, patches, grid, seconds, types),
                     hf_logits(hf, ids, patches, grid, seconds, types), "transformers on our save", atol=0)
