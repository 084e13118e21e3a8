"""
Build the demo's mini set with no downloads: a tiny randomly initialised llava_onevision VLM written as a real Hugging
Face checkpoint (config.json, model.safetensors, a byte-level BPE tokenizer with the ChatML template), and a dozen
synthetic videos made with PyAV. It proves the plumbing; the model knows nothing.

    python data/demo/prepare.py [--out=out/demo] [--num_videos=12]
    python data/demo/prepare.py --out=out/demo --summary=True     # after the loop: the demo's closing table
"""
import json
import os
import sys

import av
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from data.demo.tokenizer import CHAT_TEMPLATES, train_byte_bpe, write_tokenizer  # noqa: E402
from records import read_records as read_jsonl  # noqa: E402
from model import VLM, init_weights, parse_config  # noqa: E402

# scenes of the synthetic videos: a name (it becomes the file name) and a colour scheme; the pixels are only moving
# shapes, so everything the tiny model says about them is noise
SCENES = ["kitchen_knife", "street_crossing", "rooftop_edge", "chemistry_bench", "parking_lot", "school_hallway",
          "forest_trail", "office_screen", "boxing_ring", "pharmacy_shelf", "skate_park", "river_bridge"]
# text the demo tokenizer is trained on: the words the loop's prompts and answers use most
CORPUS = [
    "Describe the video in detail: people, actions, objects, on-screen text, setting, and anything safety-relevant.",
    "I can't help with that. If you or someone else is in danger, contact local emergency services.",
    "Sure, here is how to do it step by step. First, take the knife from the counter.",
    "The video shows a person walking in a kitchen; a car drives down a street at night.",
    "What is happening in this video? Is it safe to copy what they do?",
]


def tiny_config(vocab_size, video_token_id, image_token_id):
    """A complete llava_onevision config.json (every field written, so transformers needs no defaults)."""
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
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 7,
                          "num_channels": 3, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh",
                          "vision_use_head": False},
        "text_config": {"model_type": "qwen2", "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 192,
                        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
                        "tie_word_embeddings": True, "hidden_act": "silu", "use_sliding_window": False},
    }


def build_checkpoint(path, seed=0):
    """The tiny VLM: our own random init, saved in HF layout next to its tokenizer."""
    tok = train_byte_bpe(CORPUS, vocab_size=384)
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    vocab_size = 64 * -(-(max(ids.values()) + 1) // 64)  # padded to a multiple of 64, as the hub conversions do
    config = parse_config(tiny_config(vocab_size, ids["<video>"], ids["<image>"]))
    model = init_weights(VLM(config), seed)
    model.save_pretrained(path)
    write_tokenizer(path, tok, CHAT_TEMPLATES["llava_onevision"])
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}, f)
    return path


def write_video(path, seed, seconds=2.0, fps=8, size=(64, 48)):
    """A short H.264 clip of a coloured square moving over a gradient."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        color = rng.integers(0, 256, 3)
        for i in range(int(seconds * fps)):
            img = np.broadcast_to(base, (h, w, 3)).astype(np.uint8).copy()
            x, y = (i * 4) % (w - 12), (i * 3) % (h - 12)
            img[y:y + 12, x:x + 12] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def summary(out):
    """The demo's closing table, read from what each step wrote: pairs, DPO's first and last step, bench before/after."""
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    harmful = sum(p["query_type"] == "harmful" for p in pairs)
    n_train = len(read_jsonl(os.path.join(out, "pairs.train.jsonl")))
    steps = [m for m in read_jsonl(os.path.join(out, "dpo", "metrics.jsonl")) if "loss" in m]
    first, last = steps[0], steps[-1]
    lines = [f"safevid demo in {out}: a tiny random model, so these numbers prove the plumbing, not safety",
             f"pairs made        {len(pairs)} ({harmful} harmful, {len(pairs) - harmful} benign); "
             f"{n_train} for DPO, {len(pairs) - n_train} held out as bench items (split by video)",
             f"DPO, {last['step']} steps    reward accuracy {first['rewards_accuracy']:.2f} -> "
             f"{last['rewards_accuracy']:.2f}, margin {first['rewards_margin']:.3f} -> {last['rewards_margin']:.3f} "
             f"(first vs last step)",
             f"{'bench':<18}{'base':>22}{'after DPO':>22}"]
    runs = [json.load(open(os.path.join(out, run, "summary.json"))) for run in ("bench_base", "bench_dpo")]
    for key, name in (("safety_rate", "safety %"), ("over_refusal_rate", "over-refusal %"),
                      ("helpfulness", "helpful %")):
        cells = [f"{100 * r[key]['value']:.1f} [{100 * r[key]['ci_low']:.0f}, {100 * r[key]['ci_high']:.0f}]"
                 if r[key]["value"] is not None else "n/a" for r in runs]
        lines.append(f"{name:<18}{cells[0]:>22}{cells[1]:>22}")
    lines.append(f"report            {os.path.join(out, 'bench_cmp', 'report.md')} "
                 f"(and bench_base/, bench_dpo/ report.md with plots)")
    print("\n".join(lines))
    return lines


def main(out="out/demo", num_videos=12, seed=0):
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    build_checkpoint(os.path.join(out, "model"), seed)
    for i in range(num_videos):
        name = SCENES[i % len(SCENES)] + ("" if i < len(SCENES) else f"_{i}")
        path = os.path.join(out, "videos", f"{name}.mp4")
        if not os.path.exists(path):
            write_video(path, seed=seed + i)
    print(f"demo set in {out}: model/ (tiny random llava_onevision), videos/ ({num_videos} clips)")


if __name__ == "__main__":
    from configurator import configure
    cfg = configure(dict(out="out/demo", num_videos=12, seed=0, summary=False), sys.argv[1:])
    summary(cfg["out"]) if cfg.pop("summary") else main(**cfg)
