"""model.py's Qwen3-VL against transformers (the oracle) on a tiny random checkpoint, fp32, every position.

Covers: the config and the transformers 5 key layout (model.visual.*, model.language_model.*, lm_head); the vision
features (merged tokens and each DeepStack level) for two videos whose patch grids differ from the learned
position grid (so it is resampled) and from each other; the 3-D position ids of processor-style prompts (a timestamp
and vision start / end ids around every frame pair) against get_rope_index; logits of a batch of 2 with tied and
untied heads (interleaved multimodal RoPE, q/k norms, head_dim != hidden / heads, GQA, DeepStack); KV-cache greedy
= transformers' generate = full-forward argmax; left-padded batched generate = rows alone; the fixed-size frames path;
save_pretrained (sharded) read back by us and by transformers with identical logits.
Run: .venv/bin/python -m pytest -q tests/test_model_qwen3.py
"""

import pytest
import torch

from model import VLM, parse_config, patchify

ATOL = 1e-4  # fp32 logits of magnitude ~10; differences come from op order
VIDEO, IMAGE, START, END = 299, 298, 297, 296
# two videos: 5 frames (padded to 6) of 160x96 px and 4 frames of 96x128 px -> grids (3, 10, 6) and (2, 6, 8),
# both unlike the learned 6x6 position grid
GRIDS = [(5, 160, 96), (4, 96, 128)]
DEEPSTACK = [0, 2]


def hf_config(tie=False):
    from transformers import Qwen3VLConfig
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=36, deepstack_visual_indexes=DEEPSTACK)
    # head_dim 24 != 64 / 4; pairs 1, 4, 7 turn with h, 2, 5, 8 with w, the other six with t
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[6, 3, 3],
                                     mrope_interleaved=True))
    return Qwen3VLConfig(vision_config=vision, text_config=text, video_token_id=VIDEO, image_token_id=IMAGE,
                         vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=tie)


def hf_model(tie=False, seed=0):
    """Re-initialised at a visible scale (tests/tiny.hf_model): the default init hides bugs."""
    from tests.tiny import hf_model as visible
    return visible(hf_config(tie), seed)


def write_checkpoint(tmp_path, tie=False):
    path = str(tmp_path / "hf")
    hf = hf_model(tie)
    hf.save_pretrained(path)
    return hf, path


def inputs(batch=2, seed=0, length=90):
    """What the processor gives: input_ids with, per frame pair, a timestamp (3 text ids), vision start, the frame's
    video ids, vision end; the flattened patches, video_grid_thw and mm_token_type_ids. Rows of equal length."""
    g = torch.Generator().manual_seed(seed)
    c = parse_config(hf_config().to_dict()).vision
    rows, patches, grids = [], [], []
    for i, (nf, h, w) in enumerate(GRIDS[:batch]):
        x, grid = patchify(torch.randn(1, nf, 3, h, w, generator=g), c)
        t, per_frame = int(grid[0, 0]), int(grid[0, 1:].prod()) // 4
        parts = [torch.randint(0, 290, (4 + 2 * i,), generator=g)]  # text before the video
        for _ in range(t):
            parts += [torch.randint(0, 290, (3,), generator=g), torch.tensor([START]),
                      torch.full((per_frame,), VIDEO), torch.tensor([END])]
        used = sum(len(p) for p in parts)
        parts.append(torch.randint(0, 290, (length - used,), generator=g))  # text after it
        rows.append(torch.cat(parts))
        patches.append(x[0])
        grids.append(grid)
    ids = torch.stack(rows)
    return ids, torch.cat(patches), torch.cat(grids), (ids == VIDEO).int() * 2


def assert_close(ours, ref, what, atol=ATOL):
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"{what}: max |Δ| = {diff:.3g} > {atol}"
    return diff


def test_config_and_key_layout(tmp_path):
    _, path = write_checkpoint(tmp_path)
    c = parse_config(hf_config().to_dict())
    assert (c.family, c.text.head_dim, c.text.mrope_section, c.text.mrope_interleaved, c.text.qk_norm) == \
        ("qwen3_vl", 24, (6, 3, 3), True, True)
    assert (c.vision.patch_size, c.vision.num_position_embeddings, c.vision.deepstack_layers) == (16, 36, (0, 2))
    model, sources, _ = VLM.on_meta(path)  # every stored tensor mapped to one of ours, shapes checked
    stored = {key for _, key in sources.values()}
    assert "model.visual.deepstack_merger_list.1.norm.weight" in stored
    assert "model.language_model.layers.1.self_attn.k_norm.weight" in stored and "lm_head.weight" in stored
    assert len(sources) == len(model.state_dict())


def test_vision_features_match_transformers(tmp_path):
    hf, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    _, patches, grid, _ = inputs()
    with torch.no_grad():
        ref = hf.model.get_video_features(patches, grid)
        feats = ours.video_features(patches, grid)  # (N/4, (1 + K)·H)
    levels = feats.split(64, dim=-1)
    assert len(levels) == 1 + len(DEEPSTACK)
    diff = assert_close(levels[0], torch.cat(ref.pooler_output), "merged video tokens")
    for i, (a, b) in enumerate(zip(levels[1:], ref.deepstack_features)):
        diff = max(diff, assert_close(a, torch.cat(b), f"DeepStack level {i}"))
    print(f"qwen3_vl vision features: max |Δ| {diff:.2e}")


def test_position_ids_match_get_rope_index(tmp_path):
    hf, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    ids, _, grid, types = inputs()
    pos, _ = hf.model.get_rope_index(ids, mm_token_type_ids=types, video_grid_thw=grid.clone())
    ours_pos = ours.mrope_positions(ids, torch.arange(ids.shape[1])[None], grid)
    assert torch.equal(ours_pos, pos), "3-D position ids differ"


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tmp_path, tie):
    hf, path = write_checkpoint(tmp_path, tie)
    ours = VLM.from_pretrained(path)
    assert ("lm_head" in ours.language_model) != tie
    ids, patches, grid, types = inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid, mm_token_type_ids=types).logits
        logits = ours(ids, pixel_values_videos=patches, video_grid_thw=grid)
    assert ref.abs().max() > 1.0, "logits too small to reveal a bug: re-initialisation failed"
    diff = assert_close(logits, ref, "logits")
    print(f"qwen3_vl tie={tie}: max |Δ| logits {diff:.2e}")


def test_generate_matches_transformers_and_full_forward(tmp_path):
    """KV-cache greedy = transformers' greedy generate (new tokens at the largest prompt position + 1) = the argmax
    of full forwards over the growing row (there the new tokens are text after the video: the same positions)."""
    hf, path = write_checkpoint(tmp_path, tie=False)
    ours = VLM.from_pretrained(path)
    ids, patches, grid, types = inputs(batch=1)
    steps = 8
    with torch.no_grad():
        new = ours.generate([ids[0].tolist()], pixel_values_videos=patches, video_grid_thw=grid,
                            max_new_tokens=steps)[0]
        ref = hf.generate(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid, mm_token_type_ids=types,
                          attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False)[0, ids.shape[1]:].tolist()
        feats, row, full = ours.video_features(patches, grid), ids, []
        for _ in range(steps):
            full.append(int(ours(row, video_features=feats, video_grid_thw=grid)[0, -1].argmax()))
            row = torch.cat([row, torch.tensor([[full[-1]]])], dim=1)
    assert new == ref, f"KV-cache greedy {new} != transformers {ref}"
    assert len(set(new)) > 1, f"greedy output {new} repeats one token: too weak to test"
    assert new == full, f"KV-cache greedy {new} != full-forward argmax {full}"


def test_batched_generate_left_padding(tmp_path):
    _, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    ids, patches, grid, _ = inputs(batch=2)
    short = ids[1, 3:].tolist()  # drop three text ids before the video: the row is left-padded in the batch
    split = int(grid[0].prod())
    with torch.no_grad():
        batch = ours.generate([ids[0].tolist(), short], pixel_values_videos=patches, video_grid_thw=grid,
                              max_new_tokens=6)
        alone = [ours.generate([ids[0].tolist()], pixel_values_videos=patches[:split], video_grid_thw=grid[:1],
                               max_new_tokens=6)[0],
                 ours.generate([short], pixel_values_videos=patches[split:], video_grid_thw=grid[1:],
                               max_new_tokens=6)[0]]
    assert batch == alone, "a left-padded batch differs from each row run alone"


def test_frames_path_equals_patches(tmp_path):
    """(B, F, 3, S, S) frames (the scripts' fixed-size path) give the logits of the processor's patches."""
    _, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    ours.config.vision.image_size = 64  # 2x2 merged blocks per frame pair
    frames = torch.randn(1, 3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    n = ours.num_video_tokens(3)
    assert n == 8
    row = torch.cat([torch.tensor([1, 2, 3]), torch.full((n,), VIDEO), torch.tensor([4, 5])])[None]
    with torch.no_grad():
        patches, grid = patchify(frames, ours.config.vision)
        by_frames = ours(row, pixel_values_videos=frames)
        by_patches = ours(row, pixel_values_videos=patches[0], video_grid_thw=grid)
        by_features = ours(row, video_features=ours.video_features(frames))
    assert torch.equal(by_frames, by_patches) and torch.equal(by_frames, by_features)


def test_save_pretrained_round_trip(tmp_path):
    hf, path = write_checkpoint(tmp_path)
    ours = VLM.from_pretrained(path)
    out = str(tmp_path / "saved")
    ours.save_pretrained(out, max_shard_bytes=100_000)  # force a sharded save
    back = VLM.from_pretrained(out)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed in the round trip"
    from transformers import Qwen3VLForConditionalGeneration
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    ids, patches, grid, types = inputs()
    kwargs = dict(input_ids=ids, pixel_values_videos=patches, video_grid_thw=grid, mm_token_type_ids=types)
    with torch.no_grad():
        assert_close(reloaded(**kwargs).logits, hf(**kwargs).logits, "transformers on our save", atol=0)
