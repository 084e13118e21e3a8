"""
tokenizer.py and data/demo/tokenizer.py against their oracles: `tokenizers` (ids), transformers' chat template
(prompt text) and LlavaOnevisionProcessor (the <video> expansion).

The byte-level BPE under test is trained here with `tokenizers`' BpeTrainer in Qwen2's structure (NFC, Qwen2 split
regex + ByteLevel, ByteLevel alphabet, ChatML specials added after the vocab), so the comparison needs no download.
Run: .venv/bin/python -m pytest -q tests/test_tokenizer.py
"""

import json
import math
import random
import unicodedata

import pytest

from data.demo.tokenizer import CHAT_TEMPLATES, CHATML_SPECIALS, train_byte_bpe, write_tokenizer
from tests.tiny import train_qwen2_tokenizer
from tokenizer import Tokenizer, chat_prompt

tokenizers = pytest.importorskip("tokenizers")

TRAIN = [
    "def forward(self, x):\n    return self.proj(x) + 1  # residual\n\nclass Block(nn.Module):\n\tpass\r\n",
    "The quick brown fox can't jump; it's the dog's turn. They'll WE'LL I'D you're we've I'm 12345 3.14159",
    "在视频中，一个人正在厨房里做饭。日本語のテキストです。한국어 문장입니다.",
    "مرحبا بالعالم، هذا نص عربي. हिन्दी में पाठ। Здравствуй, мир!",
    "emoji 😀😃👍🏽 👨‍👩‍👧 🇫🇷 café naïve résumé Ångström",
    "## Markdown\n\n* item one\n* item two\n\n```python\nprint('hi')\n```\n| a | b |\n|---|---|\n",
    "    indented    with     runs of spaces\t\ttabs\n\n\n\nnewlines\r\n\r\nwindows",
] * 3

FRAGMENTS = [
    "def f(x):\n", "    return x**2\n", "\tif a != b:", "x = [1, 2, 3]", "{\"k\": null}", "i++;", "/* c */",
    "中文字符", "テスト", "한국어", "\u1100\u1161\u11a8", "مرحبا", "नमस्ते", "Привет",
    "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0301", "\u212b", "Å", "ﬁ",
    " ", "  ", "     ", "\t", "\n", "\n\n", "\r\n", " \r\n ", "\u3000", "\xa0",
    "0", "42", "2026", "3.14", "1,000,000",
    "'s", "'S", "'ll", "'LL", "'re", "'d", "can't", "I'M",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<video>", "<video", "|im_end|>", "<",
    "hello", " world", "Hello", "WORLD", "the", " the", "quick", "fox", "!", "?!", "...", "—", "“quoted”",
]
SPECIAL_EDGE_CASES = [
    "<image>\u0338 and >\u0338", "<video>\u0301x", "e<|im_end|>\u0301", "<|im_start|>user\n<video>\nWhy?<|im_end|>\n",
    "<video><video><image>", "<<video>>", "", " ", "\r\n", "'s'S'LL",
]


def corpus(n=400, seed=0):
    """Random concatenations of the fragments above (what a real prompt mixes) plus the edge cases."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(n)]
    return texts + SPECIAL_EDGE_CASES + TRAIN[:7]


def mismatches(ours, theirs, texts):
    bad = [t for t in texts if ours.encode(t) != theirs.encode(t, add_special_tokens=False).ids]
    return len(bad), bad[:3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizers-trained Qwen2-style byte-level BPE with ChatML specials, written as a checkpoint dir."""
    tk = train_qwen2_tokenizer(TRAIN + corpus(200, seed=7), vocab_size=1200)  # covers much of the test text
    d = tmp_path_factory.mktemp("trained")
    tk.save(str(d / "tokenizer.json"))
    n = tk.get_vocab_size()
    ids = {t: tk.token_to_id(t) for t in CHATML_SPECIALS}
    (d / "config.json").write_text(json.dumps({"model_type": "llava_onevision", "video_token_index": ids["<video>"],
                                               "image_token_index": ids["<image>"]}))
    return d, tk, n


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    write_tokenizer(str(d), train_byte_bpe(TRAIN + corpus(200, seed=7), vocab_size=600))
    return d


def test_trained_tokenizer_matches_tokenizers(trained):
    d, tk, n = trained
    tok = Tokenizer.from_pretrained(str(d))
    texts = corpus()
    assert mismatches(tok, tk, texts) == (0, [])
    assert tok.vocab_size == n
    assert tok.video_token_id == tk.token_to_id("<video>") and tok.image_token_id == tk.token_to_id("<image>")
    assert tok.eos_id == tk.token_to_id("<|im_end|>") and tok.pad_id == tk.token_to_id("<|endoftext|>")
    assert tok.eos_id in tok.stop_ids


def test_gpt2_style_bytelevel_matches_tokenizers(tmp_path):
    """The other byte-level layout: a bare ByteLevel(use_regex=true) pre-tokenizer (GPT-2's regex), no normalizer."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TRAIN + corpus(200, seed=7), trainers.BpeTrainer(
        vocab_size=800, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(str(tmp_path / "tokenizer.json"))
    assert tok.normalize is None
    assert mismatches(tok, tk, corpus(seed=3)) == (0, [])


def test_roundtrip(trained):
    tok = Tokenizer.from_pretrained(str(trained[0]))
    texts = [t for t in corpus(seed=1) if unicodedata.is_normalized("NFC", t)]
    assert len(texts) > 200
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    # decode equals tokenizers' decode with special tokens kept
    ids = tok.encode("<|im_start|>user\n日本 😀<|im_end|>")
    assert tok.decode(ids) == trained[1].decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special=True) == trained[1].decode(ids, skip_special_tokens=True)


def test_demo_tokenizer_matches_tokenizers_and_transformers(demo):
    from transformers import AutoTokenizer
    hf = tokenizers.Tokenizer.from_file(str(demo / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(str(demo))
    texts = corpus(seed=2)
    assert mismatches(tok, hf, texts) == (0, [])
    auto = AutoTokenizer.from_pretrained(str(demo))
    bad = [t for t in texts if auto.encode(t, add_special_tokens=False) != tok.encode(t)]
    assert bad == []
    assert [tok.encode(s) for s in CHATML_SPECIALS] == [[600 + k] for k in range(5)]  # right after the BPE vocab
    assert auto.eos_token == "<|im_end|>" and auto.pad_token == "<|endoftext|>" and auto.bos_token is None


CONVERSATIONS = [
    [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
     {"role": "user", "content": [{"type": "text", "text": "Why is this video funny?"}, {"type": "video"}]}],
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q1"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
     {"role": "user", "content": [{"type": "text", "text": "Q2 "}, {"type": "image"},
                                  {"type": "text", "text": "end"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "no media, ünïcödé\r\n"}]}],
]


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_chat_prompt_equals_hf_template(demo, family):
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(str(demo))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = auto.apply_chat_template(messages, chat_template=CHAT_TEMPLATES[family], tokenize=False,
                                            add_generation_prompt=gen)
            assert chat_prompt(family, messages, add_generation_prompt=gen) == want
    # a plain string content is one text part
    assert chat_prompt(family, [{"role": "user", "content": "hi"}]) == chat_prompt(
        family, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_video_prompt_ids_equal_processor(demo, monkeypatch):
    """tok.encode_prompt(chat_prompt(...)) == transformers apply_chat_template + LlavaOnevisionProcessor expansion.
    torchvision is not installable here, so LlavaOnevisionVideoProcessor cannot be built: a stub stands in for the
    pixel step only (it returns frames of the right count), and the processor's own code expands <video>."""
    import numpy as np
    import torch
    import transformers.processing_utils
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.video_processing_utils import VideoProcessorMixin

    class FramesOnly(VideoProcessorMixin):
        def __call__(self, videos, **kwargs):
            return {"pixel_values_videos": [torch.zeros(len(v), 3, 35, 35) for v in videos]}

    # the processor's class check looks VideoProcessorMixin up on transformers, which hides it without torchvision
    monkeypatch.setattr(transformers.processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin,
                        raising=False)
    auto = AutoTokenizer.from_pretrained(str(demo))
    grid = 5  # image 35 / patch 7: an odd grid, pooled to ceil(5/2) = 3
    processor = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessorPil(), tokenizer=auto,
                                        video_processor=FramesOnly(), num_image_tokens=grid * grid,
                                        vision_feature_select_strategy="full",
                                        chat_template=CHAT_TEMPLATES["llava_onevision"])
    tok = Tokenizer.from_pretrained(str(demo))
    multi_turn = [{"role": "user", "content": [{"type": "text", "text": "Q1"}, {"type": "video"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                  {"role": "user", "content": [{"type": "text", "text": "Q2, then 2 more?"}]}]
    for messages, frames in ((CONVERSATIONS[0], 4), (multi_turn[:1], 1), (multi_turn, 3)):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        want = processor(text=[text], videos=[np.zeros((frames, 20, 30, 3), np.uint8)])["input_ids"][0]
        want = want.tolist() if hasattr(want, "tolist") else list(want)
        n = frames * math.ceil(grid / 2) ** 2 + 1
        got = tok.encode_prompt(chat_prompt("llava_onevision", messages), num_video_tokens=n)
        assert got == want
        assert got.count(tok.video_token_id) == n


def test_bad_tokenizer_files(tmp_path, trained):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(str(tmp_path))
    spec = json.loads((trained[0] / "tokenizer.json").read_text())
    sentencepiece = dict(spec, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                                              "split": False},
                         model=dict(spec["model"], byte_fallback=True))
    (tmp_path / "tokenizer.json").write_text(json.dumps(sentencepiece))
    with pytest.raises(ValueError, match="byte-level BPE"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision", "video_token_index": 3}))
    with pytest.raises(ValueError, match="disagree"):
        Tokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model family"):
        chat_prompt("llava", [])


def test_decode_skips_ids_past_the_vocabulary(tmp_path):
    """A model's padded embedding rows (152000 rows for 151648 tokens) can be sampled; decoding drops them, as
    `tokenizers` does, instead of raising."""
    from tests.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "ckpt")
    ours, ref = Tokenizer.from_pretrained(path), tokenizers.Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    ids = ours.encode("Hi there") + [ours.enc.max_token_value + 1, 10**6]
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False) == "Hi there"
