"""
tokenizer.py's Llama/Vicuna path (llava_next_video) against its oracles: `tokenizers` (ids, decode), transformers'
LlamaTokenizer loaded with the hub tokenizer_config fields (ids with BOS), and transformers' chat template +
LlavaNextVideoProcessor (the full video prompt ids). Also describe.py / dpo.py on a tiny llava_next_video checkpoint.

The tokenizer under test is trained here with `tokenizers` in the Llama structure:
BPE(unk, byte_fallback, fuse_unk), specials <unk>,<s>,</s>,<0x00>..<0xFF> first, a small alphabet so that CJK and
emoji need byte fallback, Metaspace(prepend_scheme="first") trained with split=true then switched to split=false,
<video>/<image> added, `<s> $A`. A second one is trained with split=false throughout, so its merges span "▁" and
exercise the chunking guard in LlamaBPE. The same recipe saved in the legacy Llama-2 layout (normalizer
Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer) is checked against `tokenizers` too, with its added tokens raw
(normalized=false, as in Llama-2) or normalized=true (<s>/<unk>/</s> as in older Llama files, a non-special <image>,
a non-special "red car" with a space).
Run: .venv/bin/python -m pytest -q tests/test_tokenizer_llama.py
"""

import json
import os
import random

import pytest

from tests.tiny import train_llama_tokenizer, write_llama_tokenizer
from tokenizer import Tokenizer, chat_prompt

tokenizers = pytest.importorskip("tokenizers")

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


def corpus(n=400, seed=0, fragments=FRAGMENTS):
    rng = random.Random(seed)
    return [("".join(rng.choice(fragments) for _ in range(rng.randint(1, 12)))) for _ in range(n)] + EDGE


def write_checkpoint_tokenizer(path, spec):
    """The tokenizer files (tests/tiny.py: hub tokenizer_config fields) and a config.json naming the family."""
    ids = write_llama_tokenizer(str(path), spec)
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
    legacy = train_llama_tokenizer(TRAIN[:8], legacy=True)
    prepend_only = dict(spec, normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}]})
    both = dict(legacy, pre_tokenizer=spec["pre_tokenizer"])  # the legacy normalizer and a Metaspace
    underscore = json.loads(json.dumps(legacy))
    underscore["normalizer"]["normalizers"][1]["content"] = "_"
    for bad, name in ((prepend_only, r"normalizer Sequence\[Prepend\] with pre_tokenizer Metaspace"),
                      (both, r"normalizer Sequence\[Prepend, Replace\] with pre_tokenizer Metaspace"),
                      (underscore, r"normalizer Sequence\[Prepend, Replace\] with pre_tokenizer none"),
                      (dict(legacy, decoder={"type": "Metaspace"}), "decoder Metaspace is not the Llama decoder"),
                      (dict(spec, decoder=None), "decoder none is not the Llama decoder")):
        (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=name):
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


def test_video_prompt_ids_equal_processor(llama, monkeypatch):
    """BOS + chat_prompt + encode_prompt == transformers' chat template + LlavaNextVideoProcessor, whose own code
    expands each <video> to frames·(g/2)². torchvision is not installable here, so a stub stands in for the video
    processor's pixel step only (frames of the right count and size)."""
    import numpy as np
    import torch
    import transformers.processing_utils
    from transformers import AutoTokenizer, LlavaNextVideoProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.video_processing_utils import VideoProcessorMixin

    from data.demo.tokenizer import CHAT_TEMPLATES
    size, patch = 56, 7  # grid 8, pooled 2x2 to 4x4 = 16 tokens per frame, as tests/tiny.py's CLIP

    class FramesOnly(VideoProcessorMixin):
        def __call__(self, videos, **kwargs):
            return {"pixel_values_videos": [torch.zeros(len(v), 3, size, size) for v in videos]}

    monkeypatch.setattr(transformers.processing_utils.transformers_module, "VideoProcessorMixin", VideoProcessorMixin,
                        raising=False)
    d, _ = llama
    processor = LlavaNextVideoProcessor(video_processor=FramesOnly(), image_processor=LlavaNextImageProcessorPil(),
                                        tokenizer=AutoTokenizer.from_pretrained(str(d)), patch_size=patch,
                                        vision_feature_select_strategy="default",
                                        chat_template=CHAT_TEMPLATES["llava_next_video"])
    tok = Tokenizer.from_pretrained(str(d))
    system = [{"role": "system", "content": [{"type": "text", "text": "A chat between a curious human and an AI."}]}]
    user = [{"role": "user", "content": [{"type": "text", "text": "Why is this  video funny? 😀"}, {"type": "video"}]}]
    multi_turn = user + [{"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
                         {"role": "user", "content": [{"type": "text", "text": "\nQ2, then 2 more?"}]}]
    for messages, frames in ((system + user, 4), (user, 1), (multi_turn, 3)):
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == chat_prompt("llava_next_video", messages)
        want = processor(text=[text], videos=[np.zeros((frames, 20, 30, 3), np.uint8)])["input_ids"][0]
        want = want.tolist() if hasattr(want, "tolist") else list(want)
        n = frames * (size // patch // 2) ** 2
        got = tok.encode_prompt(chat_prompt("llava_next_video", messages), num_video_tokens=n)
        assert got == want
        assert got[0] == tok.bos_id == 1 and got.count(tok.video_token_id) == n


# -----------------------------------------------------------------------------
# the loop's scripts on a tiny llava_next_video checkpoint (tests/tiny.py: CLIP + Llama, the tokenizer above)

@pytest.fixture(scope="module")
def nv(tmp_path_factory):
    from tests import media
    from tests.tiny import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("nv")
    ckpt = make_tiny_checkpoint(root / "ckpt", family="llava_next_video")
    (root / "videos").mkdir()
    for k in range(3):
        media.write_video(str(root / "videos" / f"v{k}.mp4"), num_frames=6 + 2 * k)
    return dict(root=root, ckpt=ckpt, videos=str(root / "videos"))


def test_tiny_checkpoint(nv):
    import torch
    from transformers import AutoTokenizer

    from model import VLM
    vlm, tok = VLM.from_pretrained(nv["ckpt"]), Tokenizer.from_pretrained(nv["ckpt"])
    assert vlm.config.family == "llava_next_video" and tok.family == "llava_next_video"
    assert vlm.config.video_token_id == tok.video_token_id and vlm.config.text.vocab_size >= tok.vocab_size
    assert vlm.num_video_tokens(2) == 2 * 16  # grid 8 pooled to 4x4, no newline
    text = "USER: <video>\nDescribe the video. ASSISTANT:"
    auto = AutoTokenizer.from_pretrained(nv["ckpt"])
    assert auto.encode(text) == tok.encode_prompt(text, 1)
    prompt = tok.encode_prompt(text, vlm.num_video_tokens(2))
    out = vlm.generate([prompt], pixel_values_videos=torch.randn(1, 2, 3, 56, 56), max_new_tokens=5,
                       stop_ids=tok.stop_ids)
    assert len(out[0]) >= 1 and isinstance(tok.decode(out[0], skip_special=True), str)


def test_describe_runs_on_nv(nv, tmp_path):
    """describe.run on the NV checkpoint; each description equals decode(generate(prompt with BOS)) done here."""
    import torch

    import describe
    import video
    from model import VLM
    cfg = {**describe.DEFAULTS, "model": nv["ckpt"], "videos": nv["videos"], "out": str(tmp_path / "d.jsonl"),
           "num_frames": 2, "max_new_tokens": 8, "batch_size": 1, "decode_workers": 0, "progress": False}
    describe.run(cfg)
    records = [json.loads(line) for line in open(tmp_path / "d.jsonl")]
    assert len(records) == 3, "a description was empty or failed"
    vlm, tok = VLM.from_pretrained(nv["ckpt"]), Tokenizer.from_pretrained(nv["ckpt"])
    prompt = tok.video_prompt(describe.load_prompt(cfg["prompt"]), vlm.num_video_tokens(2))
    assert prompt[0] == tok.bos_id and prompt.count(tok.video_token_id) == 32
    for r in records:
        pixels, _ = video.decode_video(os.path.join(nv["videos"], r["video"]), 2, "llava_next_video", 56,
                                       cfg["max_side"])
        new = vlm.generate([prompt], pixel_values_videos=torch.from_numpy(pixels)[None], max_new_tokens=8,
                           stop_ids=tok.stop_ids)
        assert r["description"] == tok.decode(new[0], skip_special=True).strip()


def test_dpo_runs_on_nv(nv, tmp_path):
    """packing.validate_pairs on NV: BOS-prefixed prompt, responses after "ASSISTANT:" as " text</s>"; prefix-shared
    log-probs equal the plain model on [prompt | response]; two training steps; the export loads as NV."""
    import torch

    import dpo
    import packing
    from model import VLM
    from video import decode_video
    refuse, comply = "I can't help with that, but here is some safety information.", "A person picks up a knife."
    records = [dict(id=f"p{k}", video=f"v{k % 3}.mp4", prompt=["What happens?", "Describe the video."][k % 2],
                    chosen=refuse, rejected=comply if k % 2 else comply + " 😀", category="weapons", subcategory="x",
                    rule="r", style="explicit", query_type="harmful") for k in range(4)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    vlm, tok = VLM.from_pretrained(nv["ckpt"]), Tokenizer.from_pretrained(nv["ckpt"])
    items, report = packing.validate_pairs(str(pairs), tok, vlm.num_video_tokens(2), 256, nv["videos"])
    assert len(items) == 4, report
    it = items[0]
    assert it["prompt_ids"][0] == tok.bos_id and it["prompt_ids"].count(tok.video_token_id) == 32
    assert it["chosen_ids"] == tok.encode(" " + refuse) + [tok.eos_id] and tok.eos_id == 2
    assert tok.decode(it["prompt_ids"] + it["chosen_ids"], skip_special=True).endswith("ASSISTANT: " + refuse)
    batch = [dict(it, pixels=torch.from_numpy(decode_video(it["video"], 2, "llava_next_video",
                                                           vlm.config.vision.image_size)[0])) for it in items[:2]]
    with torch.no_grad():
        shared = dpo.pair_logps(dpo.PairScorer(vlm), packing.collate(batch, True, tok.pad_id), "cpu")
        for b, item in enumerate(batch):
            for branch, resp in enumerate((item["chosen_ids"], item["rejected_ids"])):
                ids = torch.tensor([item["prompt_ids"] + resp])
                logp = torch.log_softmax(vlm(ids, item["pixels"][None]).double(), -1)[0]
                P = len(item["prompt_ids"])
                want = sum(logp[P - 1 + k, t].item() for k, t in enumerate(resp))
                assert abs(shared[branch][b].item() - want) <= 1e-5 * max(1.0, abs(want)), (b, branch)
    cfg = dict(dpo.DEFAULTS, init_from=nv["ckpt"], pairs=str(pairs), video_root=nv["videos"],
               out_dir=str(tmp_path / "run"), num_frames=2, max_len=256, decode_workers=0, device="cpu",
               dtype="float32", batch_size=2, gradient_accumulation_steps=1, max_iters=2, learning_rate=1e-4,
               eval_pairs=0, seed=0)
    assert dpo.train(cfg)["status"] == "done"
    final = os.path.join(cfg["out_dir"], "final")
    assert VLM.from_pretrained(final).config.family == "llava_next_video"
    exported = Tokenizer.from_pretrained(final)  # the tokenizer files travel with the export
    text = "USER: <video>\nHi ASSISTANT:"
    assert exported.encode_prompt(text, 2) == tok.encode_prompt(text, 2)
    assert exported.bos_id == 1 and exported.stop_ids == tok.stop_ids


def test_dpo_recipe_config():
    """config/llava_next_video.py is valid for dpo.py and its token budget holds the 32-frame video."""
    import configurator
    import dpo
    cfg = configurator.configure(dpo.DEFAULTS, [os.path.join(os.path.dirname(__file__), "..", "config",
                                                             "llava_next_video.py")])
    assert cfg["fsdp"] and cfg["init_from"].endswith("LLaVA-NeXT-Video-7B-hf")
    assert cfg["num_frames"] * 144 + 1024 <= cfg["max_len"] <= 4096 * 2  # video + text within Vicuna's scaled RoPE


def test_normalized_added_tokens(tmp_path):
    """Older Llama files mark <unk>/<s>/</s> normalized=true; with no normalizer that matches the same raw text."""
    spec = train_llama_tokenizer(TRAIN[:8])
    for t in spec["added_tokens"]:
        t["normalized"] = t["content"] in ("<unk>", "<s>", "</s>")
    d = write_checkpoint_tokenizer(tmp_path, spec)
    ref, tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")), Tokenizer.from_pretrained(str(d))
    texts = corpus(100, seed=5) + ["<s>x</s> <unk><s>", " </s>", "a<s>"]
    assert [t for t in texts if tok.encode(t) != ref.encode(t, add_special_tokens=False).ids] == []


def test_ignore_merges(tmp_path):
    """BPE(ignore_merges=true): a segment that is itself a vocab piece is that piece, whatever the merges say."""
    spec = train_llama_tokenizer(TRAIN[:8], split_words=False)
    spec["model"]["ignore_merges"] = True
    first = min(t["id"] for t in spec["added_tokens"] if t["content"] in ("<video>", "<image>"))
    spec["model"]["vocab"].update({"▁zqx": first, "q▁z": first + 1})  # pieces no merge builds, before the added
    for t in spec["added_tokens"]:
        t["id"] += 2 if t["content"] in ("<video>", "<image>") else 0
    d = write_checkpoint_tokenizer(tmp_path, spec)
    ref, tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")), Tokenizer.from_pretrained(str(d))
    pieces = [p.replace("▁", " ") for p in spec["model"]["vocab"] if len(p) > 2 and "<" not in p][:200]
    texts = pieces + [p.lstrip() for p in pieces] + corpus(100, seed=6) + ["zqx", " zqx", "<video>q z", "zqx zqx"]
    assert tok.encode("zqx") == [first] and tok.encode("<video>q z")[1:] == [first + 1]
    assert [t for t in texts if tok.encode(t) != ref.encode(t, add_special_tokens=False).ids] == []


# -----------------------------------------------------------------------------
# the legacy Llama-2 layout: normalizer Sequence[Prepend("▁"), Replace(" ", "▁")], no pre-tokenizer

LEGACY_FRAGMENTS = FRAGMENTS + ["red car", " red car", "red  car", "ared car", "red car>", "\t\t", "  \n  ", "2024",
                                "1 2 3", "<s> ", " <s>", " </s>", " <image>", " <unk>"]
LEGACY_EDGE = ["a", "nospaces", " lead", "trail ", "a  b", "   ", "\t", "\n\n", "<s>", " <s>", "a<s>", "a <s>b", "▁<s>",
               "<video><s>", "<video> <s>", "<video>b", "a<video>", "<image>", " <image>", "x<image>", "red car",
               " red car", "<video>red car", "12 34", "中文 😀", "<s>😀</s>"]


@pytest.fixture(scope="module", params=[False, True], ids=["raw-added", "normalized-added"])
def legacy(request, tmp_path_factory):
    """(directory, tokenizers oracle); normalized-added marks <unk>/<s>/</s> normalized=true, makes <image> a
    normalized non-special token and adds a normalized non-special "red car" (merges span "▁" in this one)."""
    spec = train_llama_tokenizer(TRAIN + corpus(100, seed=9), split_words=not request.param, legacy=True)
    if request.param:
        for t in spec["added_tokens"]:
            t["normalized"] = t["content"] in ("<unk>", "<s>", "</s>", "<image>")
            t["special"] = t["content"] != "<image>"
        fresh = max(list(spec["model"]["vocab"].values()) + [t["id"] for t in spec["added_tokens"]]) + 1
        spec["added_tokens"].append(dict(spec["added_tokens"][-1], id=fresh, content="red car", special=False,
                                         normalized=True))
    d = write_checkpoint_tokenizer(tmp_path_factory.mktemp("legacy"), spec)
    return d, tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


def legacy_corpus(n=600, seed=10):
    return corpus(n, seed, LEGACY_FRAGMENTS) + LEGACY_EDGE


def test_legacy_encode_matches_tokenizers(legacy):
    """ids equal tokenizers' with add_special_tokens=False (encode) and =True (BOS + encode; encode_prompt)."""
    d, ref = legacy
    tok = Tokenizer.from_pretrained(str(d))
    assert tok.llama.prepend_scheme == "legacy"
    texts = legacy_corpus()
    assert [t for t in texts if tok.encode(t) != ref.encode(t, add_special_tokens=False).ids] == []
    assert [t for t in texts if [tok.bos_id] + tok.encode(t) != ref.encode(t).ids] == []
    video = [t for t in texts if "<video>" in t]
    assert len(video) > 50 and [t for t in video if tok.encode_prompt(t, 1) != ref.encode(t).ids] == []
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.video_token_id == ref.token_to_id("<video>")
    # the corpus exercises what it claims: byte fallback; the "▁" Prepend adds after an added token ("b" alone is
    # "▁b" there, unlike the Metaspace layout); normalized added tokens matched (" <s>") and, where the text before
    # them is not a space, not ("ared car": "red car" has an id past the BPE vocab, which BPE cannot yield)
    ids = [i for t in texts for i in tok.encode(t)]
    assert any(3 <= i < 259 for i in ids), "no byte-fallback token in the corpus"
    assert "".join(ref.encode("<video>b", add_special_tokens=False).tokens[1:]) == "▁b"
    assert tok.encode("<video>b")[1:] == tok.encode("b")
    s = tok.special["<s>"]
    if tok.llama.normalized:
        assert tok.encode(" <s>")[-1] == s
        red_car = tok.special["red car"]
        assert tok.encode("red car") == [red_car] and red_car not in tok.encode("ared car")
    else:
        assert tok.encode("a<s>")[-1] == s


def test_legacy_decode_matches_tokenizers(legacy):
    """decode equals tokenizers' with skip_special_tokens both ways (a normalized special token decodes as its
    normalized piece and is not skipped, as tokenizers does); plain text round-trips."""
    d, ref = legacy
    tok = Tokenizer.from_pretrained(str(d))
    texts = legacy_corpus(seed=12)
    bad = [(t, skip) for t in texts for skip in (False, True)
           if tok.decode(tok.encode(t), skip_special=skip) != ref.decode(tok.encode(t), skip_special_tokens=skip)]
    assert bad == []
    plain = [t for t in texts if "<" not in t and "▁" not in t and "red car" not in t]
    assert len(plain) > 100 and [t for t in plain if tok.decode(tok.encode(t)) != t] == []
    emoji = tok.encode("x😀")
    cut = emoji[:-1] + [tok.vocab_size]
    assert tok.decode(cut) == ref.decode(cut) and "\ufffd" in tok.decode(cut)
