"""Tiny random checkpoints written by transformers itself (the oracle), for tests across the project.

    from tests.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "ckpt")              # llava_onevision, with a byte-level BPE tokenizer
    path = make_tiny_checkpoint(tmp_path / "q", family="qwen2_5_vl")  # Qwen2.5-VL, its <|vision_start|>... specials
    path = make_tiny_checkpoint(tmp_path / "q3", family="qwen3_vl")   # Qwen3-VL (DeepStack), the same specials

Weights are re-initialised at a visible scale (N(0, 1/fan_in), norms U(0.5, 1.5)): the default init gives logits of
~0.5, which hides bugs. The SigLIP grid is odd (35/7 = 5 patches a side, pooled with a ceiling to 3).
"""
import json
import math
import os

import torch


# what make_tiny_checkpoint's tokenizer is trained on: enough words for readable decodes
CORPUS = [
    "A person walks into a kitchen and picks up a knife from the counter.",
    "The video shows a red car driving on a wet road at night.",
    "I can't help with that, but here is some safety information.",
    "Describe the video in detail. What happens first, and what next?",
    "Two people talk in a park; a dog runs across the grass.",
] * 4
# Qwen2.5-VL's added tokens, in the hub's order (ids 151643.. there, right after the BPE vocab here)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def hf_config(family="llava_onevision", tie=True, kv_heads=2, vocab_size=256, video_token_id=255, image_token_id=254,
              rope_scaling=None, feature_layer=None):
    """A transformers config for a tiny model of `family` (dict sub-configs)."""
    from transformers import LlavaNextVideoConfig, LlavaOnevisionConfig, Qwen2_5_VLConfig, Qwen3VLConfig
    if family == "qwen3_vl":  # DeepStack from ViT blocks 0 and 2 into LM layers 0 and 1; head_dim 24 = 2 x (6 + 3 + 3)
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=36, deepstack_visual_indexes=[0, 2])  # a 6x6 grid, resampled
        text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=24, rms_norm_eps=1e-6,
                    tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[6, 3, 3],
                                         mrope_interleaved=True))
        return Qwen3VLConfig(vision_config=vision, text_config=text, video_token_id=video_token_id,
                             image_token_id=image_token_id, vision_start_token_id=video_token_id - 3,
                             vision_end_token_id=video_token_id - 2, tie_word_embeddings=tie)
    if family == "qwen2_5_vl":  # 2 windowed + 2 full-attention ViT blocks; head_dim 16 = 2 x (2 + 3 + 3) mrope
        vision = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[1, 3], window_size=112, tokens_per_second=2)
        text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                    rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]), tie_word_embeddings=tie,
                    bos_token_id=None, eos_token_id=None)
        return Qwen2_5_VLConfig(vision_config=vision, text_config=text, video_token_id=video_token_id,
                                image_token_id=image_token_id,  # hub order: ..., vision_start, vision_end, image, video
                                vision_start_token_id=video_token_id - 3,
                                vision_end_token_id=video_token_id - 2, tie_word_embeddings=tie)
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                max_position_embeddings=4096)
    if family == "llava_onevision":
        vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, image_size=35, patch_size=7, vision_use_head=False)
        text.update(model_type="qwen2", rope_theta=1e6, rms_norm_eps=1e-6)
        return LlavaOnevisionConfig(vision_config=vision, text_config=text, video_token_index=video_token_id,
                                    image_token_index=image_token_id, tie_word_embeddings=tie,
                                    vision_feature_layer=-1 if feature_layer is None else feature_layer,
                                    vision_feature_select_strategy="full")
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, image_size=56, patch_size=7)
    text.update(model_type="llama", rms_norm_eps=1e-5)
    if rope_scaling:
        text["rope_scaling"] = dict(rope_type="linear", factor=rope_scaling)
    return LlavaNextVideoConfig(vision_config=vision, text_config=text, video_token_index=video_token_id,
                                image_token_index=image_token_id, tie_word_embeddings=tie,
                                vision_feature_layer=-2 if feature_layer is None else feature_layer,
                                vision_feature_select_strategy="default")


def hf_model(config, seed=0):
    """The transformers model for `config`, re-initialised at a visible scale, fp32, eval mode."""
    from transformers import (LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)
    cls = {"llava_onevision": LlavaOnevisionForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": Qwen3VLForConditionalGeneration,
           "llava_next_video": LlavaNextVideoForConditionalGeneration}[config.model_type]
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_q" in name):  # ln_q: Qwen2.5-VL's merger norm
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def make_tiny_checkpoint(path, family="llava_onevision", tie=True, seed=0, tokenizer=True):
    """Write a tiny random HF checkpoint (config.json, model.safetensors, and a tokenizer whose special ids match
    the config: byte-level BPE for llava_onevision and the Qwen families, Llama-style for llava_next_video) to `path`;
    returns str(path)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    vocab_size, video_id, image_id = 256, 255, 254
    if tokenizer and family == "llava_next_video":
        spec = train_llama_tokenizer(CORPUS, vocab_size=300)  # <video>, <image> get ids 300, 301
        ids = write_llama_tokenizer(path, spec)
        video_id, image_id = ids["<video>"], ids["<image>"]
        vocab_size = 64 * math.ceil((max(ids.values()) + 1) / 64)
    elif tokenizer:
        from data.demo.tokenizer import train_byte_bpe, write_tokenizer  # pure-Python BPE trainer
        qwen = family in ("qwen2_5_vl", "qwen3_vl")
        specials = QWEN_SPECIALS if qwen else ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
        tok = train_byte_bpe(CORPUS, vocab_size=300, special_tokens=specials)  # specials get ids 300, 301, ...
        write_tokenizer(path, tok)
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        video_id, image_id = (ids["<|video_pad|>"], ids["<|image_pad|>"]) if qwen else (ids["<video>"], ids["<image>"])
        vocab_size = 64 * math.ceil((max(ids.values()) + 1) / 64)  # padded like the hub checkpoints
    config = hf_config(family, tie=tie, vocab_size=vocab_size, video_token_id=video_id, image_token_id=image_id)
    hf_model(config, seed).save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    return path


# -----------------------------------------------------------------------------
# the llava_next_video tokenizer: Llama/Vicuna structure, trained with `tokenizers` (test-only)

LLAMA_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def train_qwen2_tokenizer(texts, vocab_size):
    """A `tokenizers` Tokenizer in Qwen2's structure (NFC, Qwen2 split regex + ByteLevel, the full byte alphabet),
    trained on `texts`, with the ChatML specials added right after the BPE vocab as in Qwen2."""
    import tokenizers
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    from data.demo.tokenizer import CHATML_SPECIALS, QWEN2_PATTERN
    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_special_tokens(list(CHATML_SPECIALS))
    return tk


def train_llama_tokenizer(texts, vocab_size=400, limit_alphabet=40, split_words=True, legacy=False):
    """A Llama-structured tokenizer.json dict: BPE(unk, byte_fallback, fuse_unk), <unk>,<s>,</s>,<0x00>..<0xFF> as
    ids 0..258, a small alphabet (other characters fall back to bytes), Metaspace(prepend_scheme="first") trained
    with split=`split_words` and saved with split=false, <video>/<image> added after the vocab, `<s> $A`.
    legacy: saved in the older Llama-2 layout instead, normalizer Sequence[Prepend("▁"), Replace(" ", "▁")] and no
    pre-tokenizer (same vocab and merges)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=split_words)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + LLAMA_BYTES,
                                  limit_alphabet=limit_alphabet, show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    if legacy:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tk.pre_tokenizer = None
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.add_special_tokens(["<video>", "<image>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", 1)])
    spec = json.loads(tk.to_str())
    # as in the hub file, the <0xNN> pieces are plain vocab entries, not added tokens
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in LLAMA_BYTES]
    return spec


def write_llama_tokenizer(path, spec):
    """tokenizer.json + the hub tokenizer_config.json fields of LLaVA-NeXT-Video-7B-hf; returns
    {added token: id}."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in spec["added_tokens"]}
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": True, "add_bos_token": True,
              "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<unk>", "padding_side": "left", "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, "added_tokens_decoder": added}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False)
    return {t["content"]: t["id"] for t in spec["added_tokens"]}
