"""Trainable state of LoRA DPO vs full fine-tuning, by counting parameters (a script, not a test).

    .venv/bin/python tests/bench_lora.py

Models are built on the `meta` device from config dicts (exact parameter counts, no memory): the tiny test model,
LLaVA-OneVision-7B's shape (Qwen2-7B + SigLIP-400M) and LLaVA-NeXT-Video-7B's (Vicuna-7B + CLIP-L/336). Trainable
state = parameters + gradients + AdamW's two moments, all fp32: 16 bytes per trainable parameter. Full fine-tuning
trains the LM and keeps the towers frozen (dpo.py's default); LoRA trains A and B only (lora.TARGETS).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
from model import VLM, parse_config  # noqa: E402

SHAPES = {  # config.json fields that set the sizes (the rest are the classes' defaults)
    "tiny (tests)": dict(model_type="llava_onevision", tie_word_embeddings=True,
                         vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=4, image_size=35, patch_size=7),
                         text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                          num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)),
    "llava-onevision-7b": dict(model_type="llava_onevision",
                               vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                                  num_attention_heads=16, image_size=384, patch_size=14),
                               text_config=dict(vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)),
    "llava-next-video-7b": dict(model_type="llava_next_video",
                                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                   num_attention_heads=16, image_size=336, patch_size=14),
                                text_config=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                                                 num_hidden_layers=32, num_attention_heads=32)),
}
BYTES = 4 + 4 + 8  # fp32 parameter + gradient + Adam m and v


def count(raw, rank):
    """(LM parameters: what full fine-tuning trains, all parameters, LoRA's trainable parameters) at `rank`."""
    with torch.device("meta"):
        vlm = VLM(parse_config(raw))
    total = sum(p.numel() for p in vlm.parameters())
    lm = sum(p.numel() for p in vlm.language_model.parameters())
    lora.add_lora(vlm, rank=rank, alpha=2 * rank)
    return lm, total, sum(p.numel() for p in vlm.parameters() if p.requires_grad)


if __name__ == "__main__":
    print("| model | params | full FT trains (LM) | LoRA r=16 trains | trainable state full FT | LoRA | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name, raw in SHAPES.items():
        lm, total, trained = count(raw, 16)
        gb = lambda n: f"{n * BYTES / 1e9:.2f} GB" if n * BYTES > 1e8 else f"{n * BYTES / 1e6:.2f} MB"  # noqa: E731
        print(f"| {name} | {total / 1e6:.1f}M | {lm / 1e6:.1f}M | {trained / 1e6:.2f}M | {gb(lm)} | {gb(trained)} "
              f"| {100 * trained / lm:.2f}% |")
