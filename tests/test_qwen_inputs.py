"""Qwen2.5-VL inputs: the chat prompt against the hub chat template (rendered by transformers), the video token
count against the processor's rule, and video.py's preprocessing against the processor's own functions and a
PIL oracle of its pixel maths.

torchvision cannot be installed beside CPU torch 2.13 here, so Qwen2VLVideoProcessor cannot be imported: its
`smart_resize` and `sample_frames` are taken from transformers' source file and run as they are (not copied into
the repository), and the pixels are checked against PIL's antialiased bicubic + CLIP normalisation + patchify.
Run: .venv/bin/python -m pytest -q tests/test_qwen_inputs.py
"""
import ast
import math
import os

import numpy as np
import pytest
import torch

from tokenizer import Tokenizer, chat_prompt

# Qwen2.5-VL-7B-Instruct's chat_template.json, verbatim
QWEN2_5_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens here?"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
     {"role": "user", "content": [{"type": "text", "text": "Why is this funny? "}, {"type": "video"}]}],
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q1"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
     {"role": "user", "content": [{"type": "text", "text": "Q2 "}, {"type": "image"}, {"type": "text", "text": "end"}]}],
]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A Qwen2-structured byte-level BPE with Qwen2.5-VL's specials and a config.json naming the family."""
    import json

    from tests.tiny import CORPUS, train_qwen2_tokenizer
    path = tmp_path_factory.mktemp("qwen_tok")
    tk = train_qwen2_tokenizer(CORPUS, vocab_size=400)
    tk.add_special_tokens(QWEN_SPECIALS)
    tk.save(str(path / "tokenizer.json"))
    ids = {s: tk.token_to_id(s) for s in QWEN_SPECIALS}
    with open(path / "config.json", "w") as f:
        json.dump({"model_type": "qwen2_5_vl", "video_token_id": ids["<|video_pad|>"],
                   "image_token_id": ids["<|image_pad|>"]}, f)
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    return path


def test_chat_prompt_equals_hub_template(qwen_dir):
    from transformers import PreTrainedTokenizerFast
    auto = PreTrainedTokenizerFast(tokenizer_file=str(qwen_dir / "tokenizer.json"))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = auto.apply_chat_template(messages, chat_template=QWEN2_5_VL_TEMPLATE, tokenize=False,
                                            add_generation_prompt=gen)
            assert chat_prompt("qwen2_5_vl", messages, add_generation_prompt=gen) == want


def test_video_prompt_ids(qwen_dir):
    """The processor expands <|video_pad|> to t·h·w / merge² ids (Qwen2_5_VLProcessor.replace_video_token)."""
    tok = Tokenizer.from_pretrained(str(qwen_dir))
    grid = (3, 10, 6)
    n = math.prod(grid) // 4
    ids = tok.video_prompt("What happens here?", n)
    text = chat_prompt("qwen2_5_vl", CONVERSATIONS[0]).replace("<|video_pad|>", "<|video_pad|>" * n)
    assert ids == tok.encode(text)
    assert ids.count(tok.video_token_id) == n
    start = ids.index(tok.video_token_id)
    assert ids[start - 1] == tok.special["<|vision_start|>"] and ids[start + n] == tok.special["<|vision_end|>"]
    assert tok.response("Fine.")[-1] == tok.special["<|im_end|>"] == tok.eos_id


# -----------------------------------------------------------------------------
# preprocessing

def processor_functions():
    """smart_resize and Qwen2VLVideoProcessor.sample_frames, compiled from transformers' own source file."""
    import transformers
    file = os.path.join(os.path.dirname(transformers.__file__), "models", "qwen2_vl", "video_processing_qwen2_vl.py")
    with open(file) as f:
        tree = ast.parse(f.read())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    wanted += [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames"]
    for n in wanted:
        n.decorator_list = []
    namespace = {"math": math, "torch": torch, "VideoMetadata": object}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), file, "exec"), namespace)
    return namespace["smart_resize"], namespace["sample_frames"]


def test_smart_resize_and_frame_choice_equal_processor():
    import video
    smart_resize, sample_frames = processor_functions()
    for h, w in [(240, 320), (241, 321), (480, 270), (28, 28), (1080, 1920), (17, 900), (3000, 4000)]:
        for lo, hi in [(128 * 28 * 28, 768 * 28 * 28), (3136, 12845056), (56 * 56, 64 * 28 * 28)]:
            assert video.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == smart_resize(
                h, w, factor=28, min_pixels=lo, max_pixels=hi), (h, w, lo, hi)

    class Meta:
        def __init__(self, total, fps):
            self.total_num_frames, self.fps = total, fps

    class Defaults:  # the processor's attributes sample_frames reads
        num_frames, fps, min_frames, max_frames = None, None, 4, 768

    for total, video_fps in [(75, 25.0), (10, 30.0), (300, 29.97), (9, 1.0), (2000, 24.0), (7, 2.0)]:
        for fps in (2.0, 1.0, 0.5, 4.0):
            want = sample_frames(Defaults(), Meta(total, video_fps), temporal_patch_size=2, fps=fps).tolist()
            assert video.qwen_frame_indices(total, video_fps, fps=fps) == want, (total, video_fps, fps)


def test_preprocess_against_pil_oracle(tmp_path):
    """A PyAV clip -> video.decode_video_qwen (frames by fps, smart_resize, CLIP mean/std) against every decoded
    frame picked by the processor's indices, resized by PIL (antialiased bicubic on uint8), normalised in numpy:
    within 2 grey levels; then model.patchify gives the processor's patch layout and video_grid_thw."""
    from PIL import Image

    import video
    from model import parse_config, patchify
    from tests.media import write_video
    path = str(tmp_path / "clip.mp4")
    write_video(path, num_frames=23, fps=10, size=(94, 152))
    patches_in, info = video.decode_video_qwen(path, fps=2.0, min_pixels=56 * 56, max_pixels=64 * 28 * 28)
    frames_all, _ = video.read_all_frames(path)
    _, sample_frames = processor_functions()

    class Meta:
        total_num_frames, fps = len(frames_all), 10.0

    class Defaults:
        num_frames, fps, min_frames, max_frames = None, None, 4, 768

    idx = sample_frames(Defaults(), Meta(), temporal_patch_size=2, fps=2.0).tolist()
    assert info["indices"] == idx
    H, W = video.smart_resize(94, 152, min_pixels=56 * 56, max_pixels=64 * 28 * 28)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32) * 255
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32) * 255
    oracle = np.stack([(np.asarray(Image.fromarray(frames_all[i]).resize((W, H), Image.BICUBIC), np.float32) - mean)
                       / std for i in idx]).transpose(0, 3, 1, 2)
    assert patches_in.shape == oracle.shape == (len(idx), 3, H, W)
    grey = np.abs(patches_in - oracle) * std[None, :, None, None]
    assert grey.max() <= 2.0, f"pixels differ by {grey.max():.2f} grey levels"
    print(f"qwen preprocessing vs PIL oracle: max {grey.max():.2f} grey levels")
    assert info["second_per_grid_ts"] == 2 / (len(idx) / len(frames_all) * 10.0)  # 2 / the processor's sampled fps
    vision = parse_config({"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_attention_heads": 28,
                          "num_key_value_heads": 4}).vision  # 7B-shaped
    flat, grid = patchify(torch.from_numpy(patches_in)[None], vision)
    assert grid.tolist() == [[math.ceil(len(idx) / 2), H // 14, W // 14]]
    assert flat.shape == (1, grid.prod().item(), 3 * 2 * 14 * 14)
