"""Tiny random checkpoints written by transformers itself (the oracle), for tests across the project.

    from tests.tiny import make_tiny_checkpoint
    path = make_tiny_checkpoint(tmp_path / "ckpt")              # llava_onevision, with a byte-level BPE tokenizer

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


def hf_config(family="llava_onevision", tie=True, kv_heads=2, vocab_size=256, video_token_id=255, image_token_id=254,
              rope_scaling=None, feature_layer=None):
    """A transformers config for a tiny model of `family` (dict sub-configs, as in shared/reference §5.1)."""
    from transformers import LlavaNextVideoConfig, LlavaOnevisionConfig
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
    from transformers import LlavaNextVideoForConditionalGeneration, LlavaOnevisionForConditionalGeneration
    cls = (LlavaOnevisionForConditionalGeneration if config.model_type == "llava_onevision"
           else LlavaNextVideoForConditionalGeneration)
    torch.manual_seed(seed)
    model = cls(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def make_tiny_checkpoint(path, family="llava_onevision", tie=True, seed=0, tokenizer=True):
    """Write a tiny random HF checkpoint (config.json, model.safetensors, and a byte-level BPE tokenizer whose
    special ids match the config) to `path`; returns str(path)."""
    path = str(path)
    os.makedirs(path, exist_ok=True)
    vocab_size, video_id, image_id = 256, 255, 254
    if tokenizer:
        from data.demo.tokenizer import train_byte_bpe, write_tokenizer  # pure-Python BPE trainer
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
        tok = train_byte_bpe(CORPUS, vocab_size=300, special_tokens=specials)  # specials get ids 300..304
        write_tokenizer(path, tok)
        ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
        video_id, image_id = ids["<video>"], ids["<image>"]
        vocab_size = 64 * math.ceil((max(ids.values()) + 1) / 64)  # padded like the hub checkpoints
    config = hf_config(family, tie=tie, vocab_size=vocab_size, video_token_id=video_id, image_token_id=image_id)
    hf_model(config, seed).save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["model_type"] == family
    return path
