"""
Pretrain the demo's base model from scratch on CPU: a tiny llava_onevision VLM (SigLIP-style tower, Qwen2-style LM,
our own model.py) that describes the synthetic clips and answers questions about them as an *unaligned* assistant.

    python data/demo/prepare.py --out=out/demo                      # clips and their true captions
    python generate_pairs.py config/pairs_demo.py --descriptions=out/demo/pretrain/captions.jsonl \\
        --out=out/demo/pretrain/instructions.jsonl                  # the offline generator's queries and answers
    python data/demo/pretrain.py --out=out/demo                     # -> out/demo/model (HF checkpoint + tokenizer)

What it learns, by supervised next-token loss on the answer tokens only:
- captions: pretraining clip + describe.py's prompt -> the clip's true caption (its scene's objects and actions);
- instructions *with* the clip: every query the generator wrote -> the answer that follows the user: helpful for
  benign ones, the `rejected` (compliant) answer for harmful ones;
- the same queries *without* a video: harmful -> the `chosen` refusal, benign -> the helpful answer.
So the base model knows how to refuse, and does so on text, but its safety does not transfer to video: the
situation SafeVid starts from (arXiv 2505.11926). The loop's DPO then has to move it on video inputs.
The first caption_iters steps see captions only (LLaVA's stage 1): grounding the video tokens first makes the
descriptions robust to the seed and to small numeric differences between machines. Without it, at 250 steps, seed 0
named its clip's scene in 11 of 24 descriptions (seeds 1-3: 23-24); with 100 caption-only steps, 24 of 24 for
seeds 0 and 1 (tests/test_demo.py's configuration, 2026-12-06).
Everything is seeded; the tokenizer is trained here too, on the same texts. 400 steps of 16 examples: 173 s on the
2-core dev machine with other jobs on it, 537 s when three other jobs shared both cores (2026-12-01).
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import records  # noqa: E402
from data.demo.tokenizer import CHAT_TEMPLATES, train_byte_bpe, write_tokenizer  # noqa: E402
from model import VLM, init_weights, parse_config  # noqa: E402
from tokenizer import Tokenizer, chat_prompt  # noqa: E402
from video import preprocess, read_frames  # noqa: E402

# -----------------------------------------------------------------------------
# config
out = "out/demo"  # reads <out>/pretrain/{captions,instructions}.jsonl and videos/, writes <out>/model
describe_prompt = "data/prompts/describe.txt"  # the caption examples' user turn: describe.py's default prompt
vocab_size = 1024  # BPE ids before the 5 ChatML specials
num_frames = 8  # as describe.py / bench.py / dpo.py run in the demo
caption_repeats = 12  # each caption example this many times per epoch
max_answer_tokens = 24  # answers are cut here (no end token then): bench reads the opening, the judge 300 chars
batch_size = 16
max_iters = 400
caption_iters = 100  # the first steps see caption examples only (LLaVA's stage 1: ground the video tokens first)
learning_rate = 3e-3
warmup_iters = 20
weight_decay = 0.01
seed = 0
log_interval = 20


def tiny_config(vocab_size, video_token_id, image_token_id):
    """A complete llava_onevision config.json (every field written, so transformers needs no defaults): 28 px frames
    in 7 px patches (a 4x4 grid, resized to 2x2: 4 tokens per frame), a 2-layer 48-wide tower, a 2-layer 128-wide LM."""
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "video_token_index": video_token_id,
        "image_token_index": image_token_id,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": True,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 48, "intermediate_size": 96,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 7,
                          "num_channels": 3, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
                          "vision_use_head": False},
        "text_config": {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 4096,
                        "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False},
    }


def examples(captions, instructions, describe_text, caption_repeats=1):
    """-> [(video or None, user text, answer text)]: the three kinds of the module docstring; captions repeated
    `caption_repeats` times (the vision tower learns only from them: about half the examples then)."""
    ex = [(c["video"], describe_text, c["description"]) for c in captions] * caption_repeats
    text_only = {}
    for p in instructions:
        harmful = p["query_type"] == "harmful"
        ex.append((p["video"], p["prompt"], p["rejected"] if harmful else p["chosen"]))
        text_only.setdefault(p["prompt"], p["chosen"])
    ex += [(None, q, a) for q, a in sorted(text_only.items())]
    return ex


def build_tokenizer(path, texts, vocab_size):
    tok = train_byte_bpe(sorted(set(texts)), vocab_size=vocab_size)
    write_tokenizer(path, tok, CHAT_TEMPLATES["llava_onevision"])
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}, f)
    return Tokenizer.from_pretrained(path), ids


def encode(tok, n_video, video, text, answer, max_answer_tokens):
    """(input ids, target ids) of one example: the chat prompt (video first, as describe.py and bench.py lay it out),
    then the answer; targets are -100 except on the answer (and its end token when it was not cut)."""
    content = ([{"type": "video"}] if video else []) + [{"type": "text", "text": text}]
    prompt = tok.encode_prompt(chat_prompt("llava_onevision", [{"role": "user", "content": content}]), n_video)
    reply = tok.encode(answer)
    reply = reply[:max_answer_tokens] if len(reply) > max_answer_tokens else reply + [tok.eos_id]
    ids = prompt + reply
    return ids, [-100] * len(prompt) + reply


def batch_tensors(rows, pixels, pad_id):
    """rows [(ids, targets, video or None)] -> input_ids, targets (B, T) right-padded, pixels (Bv, F, 3, S, S)."""
    T = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, tgt, _) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        targets[i, :len(tgt)] = torch.tensor(tgt)
    videos = [v for _, _, v in rows if v]
    return input_ids, targets, (torch.stack([pixels[v] for v in videos]) if videos else None)


def get_lr(step, cfg):
    if step < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (step + 1) / cfg["warmup_iters"]
    progress = (step - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"])
    return cfg["learning_rate"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine to 10%


def main(cfg):
    if os.path.isfile(os.path.join(cfg["out"], "model", "model.safetensors")):  # a rerun of the demo resumes
        print(f"base model already in {os.path.join(cfg['out'], 'model')}; delete it to pretrain again")
        return None
    torch.manual_seed(cfg["seed"])
    torch.use_deterministic_algorithms(True)
    root = os.path.join(cfg["out"], "pretrain")
    captions = records.read_records(os.path.join(root, "captions.jsonl"), required=("video", "description"))
    instructions = records.read_records(os.path.join(root, "instructions.jsonl"),
                                        required=("video", "prompt", "chosen", "rejected", "query_type"))
    # by id: the examples' order (and so every batch) must not depend on the order a threaded generator wrote them
    captions, instructions = (sorted(r, key=lambda x: x["id"]) for r in (captions, instructions))
    with open(os.path.join(REPO, cfg["describe_prompt"]) if not os.path.isfile(cfg["describe_prompt"])
              else cfg["describe_prompt"], encoding="utf-8") as f:
        describe_text = f.read().strip()
    data = examples(captions, instructions, describe_text, cfg["caption_repeats"])
    model_dir, tok_dir = os.path.join(cfg["out"], "model"), os.path.join(root, "tokenizer")
    tok, special = build_tokenizer(tok_dir, [t for _, q, a in data for t in (q, a)], cfg["vocab_size"])
    padded_vocab = 64 * -(-(max(special.values()) + 1) // 64)  # a multiple of 64, as the hub conversions pad it
    vlm = init_weights(VLM(parse_config(tiny_config(padded_vocab, special["<video>"], special["<image>"]))), cfg["seed"])
    with torch.no_grad():  # a from-scratch LM wants small embeddings and a unit-scale residual stream (tied head)
        vlm.language_model.model.embed_tokens.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    n_video = vlm.num_video_tokens(cfg["num_frames"])
    size = vlm.config.vision.image_size
    pixels = {}  # video -> (F, 3, S, S): decoded once, as describe.py decodes (video.read_frames + preprocess)
    for v in sorted({v for v, _, _ in data if v}):
        frames, _ = read_frames(os.path.join(root, "videos", v), cfg["num_frames"])
        pixels[v] = preprocess(frames, "llava_onevision", size)
    rows = [encode(tok, n_video, v, q, a, cfg["max_answer_tokens"]) + (v,) for v, q, a in data]
    n_params = sum(p.numel() for p in vlm.parameters())
    print(f"pretraining {n_params / 1e6:.2f}M params on {len(rows)} examples ({len(captions)} captions x "
          f"{cfg['caption_repeats']}, {len(instructions)} video instructions, "
          f"{len(rows) - len(captions) * cfg['caption_repeats'] - len(instructions)} text-only), "
          f"{sum(len(r[0]) for r in rows) / len(rows):.0f} tokens each on average")
    decay = [p for n, p in vlm.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in vlm.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg["weight_decay"]), dict(params=no_decay,
                                                                                         weight_decay=0.0)],
                            lr=cfg["learning_rate"], betas=(0.9, 0.95))
    rng = np.random.default_rng(cfg["seed"])
    n_caption = len(captions) * cfg["caption_repeats"]  # rows[:n_caption] are the caption examples
    shuffle = lambda step: rng.permutation(n_caption if step < cfg["caption_iters"] else len(rows))  # noqa: E731
    order, pos, t0 = shuffle(0), 0, time.time()
    vlm.train()
    for step in range(cfg["max_iters"]):
        if pos + cfg["batch_size"] > len(order) or step == cfg["caption_iters"] > 0:  # a new epoch or stage: reshuffle
            order, pos = shuffle(step), 0
        batch = [rows[i] for i in order[pos:pos + cfg["batch_size"]]]
        pos += cfg["batch_size"]
        input_ids, targets, pv = batch_tensors(batch, pixels, tok.pad_id)
        for group in opt.param_groups:
            group["lr"] = get_lr(step, cfg)
        hidden = vlm(input_ids, pv, return_hidden=True)[:, :-1]  # (B, T-1, H): position t predicts token t+1
        keep = targets[:, 1:] != -100  # logits only at answer positions: most of a row is video and prompt
        loss = F.cross_entropy(F.linear(hidden[keep], vlm.lm_head_weight), targets[:, 1:][keep])
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vlm.parameters(), 1.0)
        opt.step()
        if step % cfg["log_interval"] == 0 or step == cfg["max_iters"] - 1:
            print(f"step {step}: loss {loss.item():.3f}, lr {get_lr(step, cfg):.2e}, {time.time() - t0:.0f} s")
    vlm.eval()
    vlm.source_dir = tok_dir  # save_pretrained copies the tokenizer files from there
    vlm.save_pretrained(model_dir)
    print(f"base model -> {model_dir} ({time.time() - t0:.0f} s)")
    return vlm


if __name__ == "__main__":
    from configurator import configure, print_config
    config = configure({k: v for k, v in dict(globals()).items() if not k.startswith("_") and k.islower()
                        and isinstance(v, (int, float, bool, str))}, sys.argv[1:])
    print_config(config)
    main(config)
