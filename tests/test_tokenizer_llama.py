"""
tokenizer.py's Llama/Vicuna path (llava_next_video) against its oracles: `tokenizers` (ids, decode), transformers'
LlamaTokenizer loaded with the hub tokenizer_config fields (ids with BOS), and transformers' chat template +
LlavaNextVideoProcessor (the full video prompt ids). Also describe.py / dpo.py on a tiny llava_next_video checkpoint.

The tokenizer under test is trained here with `tokenizers` in the Llama structure (reference/hf_checkpoints.md §5.3):
BPE(unk, byte_fallback, fuse_unk), specials <unk>,<s>,</s>,<0x00>..<0xFF> first, a small alphabet so that CJK and
emoji need byte fallback, Metaspace(prepend_scheme="first") trained with split=true then switched to split=false,
<video>/<image> added, `<s> $A`. A second one is trained with split=false throughout, so its merges span "▁" and
exercise the chunking guard in LlamaBPE.
Run: .venv/bin/python -m pytest -q tests/test_tokenizer_llama.py
"""

import json
import math
import random

import pytest

from tokenizer import Tokenizer, chat_prompt

tokenizers = pytest.importorskip("tokenizers")

BYTES = [f"<0x{b:02X}>" for b in range(256)]
TRAIN = [
    "A person walks into a kitchen and picks up a knife from the counter.",
    "The video shows a red car driving on a wet road at night, then it stops.",
    "I can't help with that, but here is some safety information for you.",
    "Describe the video in detail.  What happens first, and what happens next?",
    "def forward(self, x):\n    return self.proj(x) + 1  # residual\n\n",
    "USER: <video>\nWhat is happening here? ASSISTANT: Two people talk in a park.",
    "    indented    with     runs of spaces\t\ttabs\n\n\nnewlines",
    "在视频中，一个人正在厨房里做饭。 café naïve",
] * 5

FRAGMENTS = [
    "the", " the", "The", "video", " video", "kitchen", " knife", "person", "walks", "safety", "help", "can't",
    " ", "  ", "     ", "\t", "\n", "\n\n", "\r\n", " \n ", "▁", "▁▁", " ▁x", "\u3000", "\xa0",
    "中文字符", "厨房", "テスト", "한국어", "😀", "👍🏽", "👨‍👩‍👧", "é", "e\u0301", "Ω", "\x00", "\x7f",
    "<video>", "<image>", "<s>", "</s>", "<unk>", "<video", "video>", "<0x41>", "<0xZZ>", "<",
    "USER:", " ASSISTANT:", "ASSISTANT: ", "0", "42", "3.14", "!", "?!", "...", "—", "“quoted”", "x = [1, 2]",
]
EDGE = ["", " ", "  ", "\n", "<video>", "<video>\nWhy?", " <video> ", "a<video>b", "Why?<video>", "<video><image>",
        "<s>hi</s>", "  leading", "trailing  ", "中", "😀😀", "a▁b", "▁", "USER: <video>\nDescribe it. ASSISTANT:",
        "x" * 300, " " * 70 + "y", "ab" * 200]


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    return [("".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))) for _ in range(n)] + EDGE


def train_llama_tokenizer(texts, vocab_size=400, limit_alphabet=40, split_words=True):
    """A Llama-structured tokenizer.json dict trained with `tokenizers` (the §5.3 recipe, hub layout)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=split_words)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + BYTES,
                                  limit_alphabet=limit_alphabet, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<video>", "<image>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    spec = json.loads(tk.to_str())
    # as in the hub file, the <0xNN> pieces are plain vocab entries, not added tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in BYTES]
    return spec


def write_checkpoint_tokenizer(path, spec):
    """tokenizer.json + the hub tokenizer_config.json fields of LLaVA-NeXT-Video-7B-hf (§3.6)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in spec["added_tokens"]}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": True, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "padding_side": "left", "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "added_tokens_decoder": added}))
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    (path / "config.json").write_text(json.dumps({"model_type": "llava_next_video", "video_token_index":
                                                  ids["<video>"], "image_token_index": ids["<image>"]}))
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["words", "spanning"])
def llama(request, tmp_path_factory):
    spec = train_llama_tokenizer(TRAIN + corpus(100, seed=9), split_words=request.param)
    d = write_checkpoint_tokenizer(tmp_path_factory.mktemp("llama"), spec)
    return d, tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


def test_encode_matches_tokenizers(llama):
    d, ref = llama
    tok = Tokenizer.from_pretrained(str(d))
    texts = corpus()
    bad = [t for t in texts if tok.encode(t) != ref.encode(t, add_special_tokens=False).ids]
    assert bad == []
    # the corpus exercises what it claims: byte fallback, and (for the spanning tokenizer) merges across "▁"
    ids = [i for t in texts for i in tok.encode(t)]
    assert any(3 <= i < 259 for i in ids), "no byte-fallback token in the corpus"
    assert tok.vocab_size == ref.get_vocab_size() and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 0
    assert tok.video_token_id == ref.token_to_id("<video>") and tok.image_token_id == ref.token_to_id("<image>")
    assert tok.stop_ids == (2,)
    # with BOS, as tokenizers' post-processor adds it
    for t in texts[:50]:
        assert [tok.bos_id] + tok.encode(t) == ref.encode(t).ids


def test_spanning_merges_exercise_the_chunk_guard(tmp_path):
    """A tokenizer trained with split=false has pieces like "e▁" whose merges cross "▁": the cut regex must keep
    those boundaries whole, and the cached, chunked encoder must equal an unchunked heap BPE."""
    spec = train_llama_tokenizer(TRAIN, split_words=False)
    tok = Tokenizer.from_pretrained(str(write_checkpoint_tokenizer(tmp_path, spec)))
    assert any("▁" in p[1:] and p.strip("▁") for p in spec["model"]["vocab"]), "no piece spans a space"
    for t in corpus(200, seed=4):
        for seg in t.split("<video>"):
            if seg:
                cut, tok.llama._cut = tok.llama._cut, None
                whole = tok.llama.encode(seg, at_start=True)
                tok.llama._cut = cut
                assert tok.llama.encode(seg, at_start=True) == whole


def test_matches_transformers_llama_tokenizer(llama):
    from transformers import AutoTokenizer
    d, _ = llama
    auto = AutoTokenizer.from_pretrained(str(d))
    assert type(auto).__name__.startswith("LlamaTokenizer")
    tok = Tokenizer.from_pretrained(str(d))
    texts = corpus(seed=1)
    assert [t for t in texts if auto.encode(t) != [tok.bos_id] + tok.encode(t)] == []
    assert [t for t in texts if auto.encode(t, add_special_tokens=False) != tok.encode(t)] == []


def test_decode_matches_tokenizers(llama):
    d, ref = llama
    tok = Tokenizer.from_pretrained(str(d))
    texts = corpus(seed=2)
    for t in texts:
        ids = tok.encode(t)
        for skip in (False, True):
            assert tok.decode(ids, skip_special=skip) == ref.decode(ids, skip_special_tokens=skip), (t, skip)
    # round trip: the Llama decoder strips the one "▁" the encoder prepended (prepend_scheme="first")
    plain = [t for t in texts if "<" not in t and "▁" not in t and not t.startswith(" ")]
    assert len(plain) > 100
    assert [t for t in plain if tok.decode(tok.encode(t)) != t] == []
    # a byte-fallback run cut mid-character: one U+FFFD per byte, as tokenizers' ByteFallback decoder does
    emoji = tok.encode("x😀")
    cut = emoji[:-1] + [tok.vocab_size, 10**6]  # and ids past the vocabulary are dropped
    assert tok.decode(cut) == ref.decode(cut) and "\ufffd" in tok.decode(cut)


def test_bad_llama_files(tmp_path):
    spec = train_llama_tokenizer(TRAIN[:8])
    legacy = dict(spec, normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match="legacy Llama"):
        Tokenizer.from_pretrained(str(tmp_path))
    no_bytes = json.loads(json.dumps(spec))
    no_bytes["model"]["vocab"].pop("<0x41>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(no_bytes))
    with pytest.raises(ValueError, match="<0x41>"):
        Tokenizer.from_pretrained(str(tmp_path))
    split = dict(spec, pre_tokenizer=dict(spec["pre_tokenizer"], split=True))
    (tmp_path / "tokenizer.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match="split=false"):
        Tokenizer.from_pretrained(str(tmp_path))
