"""
The video LLM, hand-written: a ViT vision tower (SigLIP or CLIP), a 2-layer projector, spatial pooling of each frame's
patch grid, and a decoder-only LM (Qwen2 or Llama). Loads Hugging Face `llava_onevision` and `llava_next_video`
checkpoints and matches transformers' logits (tests/test_model.py); ARCHITECTURE.md lists the checkpoint layouts
read. Comments name the transformers behaviour each choice reproduces.

`qwen2_5_vl` (Qwen2.5-VL) shares the decoder (Qwen2 with multimodal RoPE: 3-D (t, h, w) positions for video tokens)
and brings its own vision tower (section "Qwen2.5-VL vision tower": 3-D patch embedding, 2-D RoPE, window attention,
2x2 patch merger); it takes the processor's inputs (`pixel_values_videos` as flattened patches, `video_grid_thw`,
`second_per_grid_ts`) and matches transformers' logits (tests/test_model_qwen.py).

`qwen3_vl` (Qwen3-VL) reuses that machinery with a Qwen3 decoder (q/k RMSNorm per head, interleaved multimodal RoPE)
and its own tower (section "Qwen3-VL vision tower": learned position grid, LayerNorm/GELU blocks, no windows, DeepStack
features added into the first LM layers); it takes the processor's ids, with a timestamp between frame pairs, and
matches transformers' logits (tests/test_model_qwen3.py).

Module names equal the 4.x hub checkpoint names of the LLaVA families (`language_model.model.layers.0.self_attn.
q_proj.weight`, ...), so loading is an identity map after normalising the key layouts found in the wild. Qwen2.5-VL
keeps the same attribute names (`vision_tower`, `multi_modal_projector` = its merger, `language_model`), so the
scripts address every family alike; `canonical_name` / `hub_name` translate its hub names (`visual.*`, `model.*`).
"""
import json
import math
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from kernels import attention

FAMILIES = ("llava_onevision", "llava_next_video", "qwen2_5_vl", "qwen3_vl")
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # the ViT + patch-merger families with 3-D text positions
# files copied next to the weights by save_pretrained, so a saved dir is a complete checkpoint
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
              "chat_template.jinja", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "added_tokens.json", "vocab.json", "merges.txt")

# -----------------------------------------------------------------------------
# config: everything derived from config.json, with the class defaults the hub configs omit


@dataclass
class VisionConfig:
    kind: str  # "siglip" or "clip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    eps: float
    act: str  # "gelu_pytorch_tanh" (SigLIP) or "quick_gelu" (CLIP)

    @property
    def grid(self):  # patches per side
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_factor: float  # linear RoPE scaling (1.0 = none)
    eps: float
    qkv_bias: bool  # Qwen2 has q/k/v biases, Llama none
    mrope_section: tuple = ()  # Qwen2.5-VL: rotary frequency pairs given to the (t, h, w) positions; () = plain RoPE
    mrope_interleaved: bool = False  # Qwen3-VL: pairs cycle t, h, w (h, w up to 3·section each) instead of chunks
    qk_norm: bool = False  # Qwen3: RMSNorm over each query / key head before RoPE


@dataclass
class VLMConfig:
    family: str
    vision: VisionConfig
    text: TextConfig
    video_token_id: int
    image_token_id: int
    feature_layers: list  # vision hidden-state indices (negative count from the end), concatenated if several
    select_strategy: str  # "full" keeps every patch; "default" drops token 0 (CLIP's CLS)
    tie_word_embeddings: bool
    raw: dict = field(repr=False, default_factory=dict)  # the config.json as read, written back by save_pretrained


VISION_DEFAULTS = {  # transformers' SiglipVisionConfig / CLIPVisionConfig defaults
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   patch_size=16, image_size=224, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 patch_size=32, image_size=224, layer_norm_eps=1e-5, hidden_act="quick_gelu"),
}
TEXT_DEFAULTS = {  # Qwen2Config / LlamaConfig defaults
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6, attention_bias=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6, attention_bias=False),
}
FAMILY_PARTS = {"llava_onevision": ("siglip", "qwen2"), "llava_next_video": ("clip", "llama")}


def parse_config(raw):
    """config.json dict -> VLMConfig. Raises ValueError for a family we do not implement."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json has model_type {family!r}; supported: {', '.join(FAMILIES)}")
    if family == "qwen2_5_vl":
        return parse_qwen_config(raw)
    if family == "qwen3_vl":
        return parse_qwen3_config(raw)
    vision_kind, text_kind = FAMILY_PARTS[family]
    v = {**VISION_DEFAULTS[vision_kind], **{k: x for k, x in raw.get("vision_config", {}).items() if x is not None}}
    t = {**TEXT_DEFAULTS[text_kind], **{k: x for k, x in raw.get("text_config", {}).items() if x is not None}}
    if t.get("num_key_value_heads") is None:
        t["num_key_value_heads"] = t["num_attention_heads"]
    if text_kind == "qwen2":
        t["attention_bias"] = True  # Qwen2 always has q/k/v biases; the config has no switch for it
    # RoPE: transformers 5 writes rope_parameters, 4.x rope_theta + rope_scaling; a top-level `factor` is ignored
    rope = t.get("rope_parameters") or {}
    scaling = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"text_config RoPE type {rope_type!r} is not supported (only default and linear)")
    layer = raw.get("vision_feature_layer", -1 if family == "llava_onevision" else -2)
    video_id = raw.get("video_token_index", raw.get("video_token_id"))
    image_id = raw.get("image_token_index", raw.get("image_token_id"))
    if video_id is None:
        video_id = 151647 if family == "llava_onevision" else 32000  # the classes' defaults
    cfg = VLMConfig(
        family=family,
        vision=VisionConfig(kind=vision_kind, hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                            num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                            patch_size=v["patch_size"], image_size=v["image_size"], eps=v["layer_norm_eps"],
                            act=v["hidden_act"]),
        text=TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                        intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
                        num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
                        head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
                        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
                        rope_factor=float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0,
                        eps=t["rms_norm_eps"], qkv_bias=bool(t["attention_bias"])),
        video_token_id=video_id,
        image_token_id=image_id if image_id is not None else (151646 if family == "llava_onevision" else 32001),
        feature_layers=[layer] if isinstance(layer, int) else list(layer),
        select_strategy=raw.get("vision_feature_select_strategy", "full" if family == "llava_onevision" else "default"),
        # transformers forces the top-level flag on when the text config says tied: use the OR
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False)),
        raw=raw,
    )
    assert cfg.text.num_heads % cfg.text.num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert cfg.vision.hidden_size % cfg.vision.num_heads == 0
    assert cfg.select_strategy in ("full", "default"), cfg.select_strategy
    return cfg


@dataclass
class QwenVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int  # 14: a patch is (temporal_patch_size, 14, 14) pixels x 3 channels
    temporal_patch_size: int  # 2 frames per patch
    merge_size: int  # the merger joins merge_size x merge_size patches into one LM token
    window_size: int  # window side in pixels (112 = 4 merged tokens)
    full_attention_layers: tuple  # blocks that attend over a whole frame pair; the others inside windows
    out_hidden_size: int  # the LM's hidden size
    tokens_per_second: int  # temporal RoPE positions per second of video
    rope_theta: float
    image_size: int = 448  # frame side of the fixed-size path (pixel_values_videos (B, F, 3, S, S)), a multiple of 28
    num_position_embeddings: int = 0  # Qwen3-VL: a learned side x side grid, resampled to each frame's patch grid
    deepstack_layers: tuple = ()  # Qwen3-VL: blocks whose outputs (merged) are added into the first LM layers

    @property
    def merge_window(self):  # window side in merged tokens
        return self.window_size // self.merge_size // self.patch_size


QWEN_VISION_DEFAULTS = dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16,
                            in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                            tokens_per_second=4, window_size=112, out_hidden_size=3584,
                            fullatt_block_indexes=[7, 15, 23, 31])  # transformers' Qwen2_5_VLVisionConfig
QWEN_TEXT_DEFAULTS = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, hidden_act="silu",
                          use_sliding_window=False)  # Qwen2_5_VLTextConfig


def parse_qwen_config(raw):
    """Qwen2.5-VL config.json -> VLMConfig. The 4.x hub files keep the text fields at the top level; transformers 5
    nests them under text_config. RoPE: 4.x `rope_scaling` {type: mrope, mrope_section}, 5.x `rope_parameters`."""
    v = {**QWEN_VISION_DEFAULTS, **{k: x for k, x in raw.get("vision_config", {}).items() if x is not None}}
    text_raw = raw.get("text_config") or raw
    t = {**QWEN_TEXT_DEFAULTS, **{k: x for k, x in text_raw.items() if x is not None and k in QWEN_TEXT_DEFAULTS}}
    if t["num_key_value_heads"] is None:
        t["num_key_value_heads"] = t["num_attention_heads"]
    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"qwen2_5_vl text RoPE type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                         f"(only the default multimodal RoPE)")
    if t["use_sliding_window"]:
        raise ValueError("qwen2_5_vl with use_sliding_window=true is not supported (no released checkpoint uses it)")
    for where, act in (("vision_config", v["hidden_act"]), ("text_config", t["hidden_act"])):
        if act != "silu":
            raise ValueError(f"qwen2_5_vl {where}.hidden_act {act!r} is not supported (only silu)")
    vision_rope = v.get("rope_parameters") or {}
    head_dim = t["hidden_size"] // t["num_attention_heads"]  # Qwen2.5-VL ignores any head_dim field
    section = tuple(rope.get("mrope_section", (16, 24, 24)))
    if sum(section) != head_dim // 2:
        raise ValueError(f"qwen2_5_vl mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2}")
    cfg = VLMConfig(
        family="qwen2_5_vl",
        vision=QwenVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                                num_layers=v["depth"], num_heads=v["num_heads"], patch_size=v["patch_size"],
                                temporal_patch_size=v["temporal_patch_size"], merge_size=v["spatial_merge_size"],
                                window_size=v["window_size"], full_attention_layers=tuple(v["fullatt_block_indexes"]),
                                out_hidden_size=v["out_hidden_size"], tokens_per_second=v["tokens_per_second"],
                                rope_theta=float(vision_rope.get("rope_theta", 10000.0))),
        text=TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                        intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
                        num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"], head_dim=head_dim,
                        rope_theta=float(rope.get("rope_theta", text_raw.get("rope_theta", 1e6))), rope_factor=1.0,
                        eps=t["rms_norm_eps"], qkv_bias=True, mrope_section=section),
        video_token_id=raw.get("video_token_id", 151656),
        image_token_id=raw.get("image_token_id", 151655),
        feature_layers=[], select_strategy="full",  # LLaVA-only fields: the Qwen tower has one output
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False) or text_raw.get("tie_word_embeddings", False)),
        raw=raw,
    )
    assert cfg.text.num_heads % cfg.text.num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert cfg.vision.hidden_size % cfg.vision.num_heads == 0 and cfg.vision.out_hidden_size == cfg.text.hidden_size
    return cfg


QWEN3_VISION_DEFAULTS = dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304,
                             num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                             out_hidden_size=3584, num_position_embeddings=2304,
                             deepstack_visual_indexes=[8, 16, 24])  # transformers' Qwen3VLVisionConfig
QWEN3_TEXT_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-6,
                           hidden_act="silu", attention_bias=False, rope_theta=500000.0)  # Qwen3VLTextConfig


def parse_qwen3_config(raw):
    """Qwen3-VL config.json -> VLMConfig. Text fields under text_config; RoPE in 4.57's `rope_scaling` + `rope_theta`
    or 5.x's `rope_parameters`, both {mrope_section, mrope_interleaved}."""
    v = {**QWEN3_VISION_DEFAULTS, **{k: x for k, x in raw.get("vision_config", {}).items() if x is not None}}
    text_raw = raw.get("text_config") or {}
    t = {**QWEN3_TEXT_DEFAULTS, **{k: x for k, x in text_raw.items() if x is not None and k in QWEN3_TEXT_DEFAULTS}}
    if t["num_key_value_heads"] is None:
        t["num_key_value_heads"] = t["num_attention_heads"]
    rope = text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        raise ValueError(f"qwen3_vl text RoPE type {rope.get('rope_type', rope.get('type'))!r} is not supported "
                         f"(only the default multimodal RoPE)")
    if t["attention_bias"]:
        raise ValueError("qwen3_vl with attention_bias=true is not supported (no released checkpoint uses it)")
    for where, act, ok in (("vision_config", v["hidden_act"], "gelu_pytorch_tanh"),
                           ("text_config", t["hidden_act"], "silu")):
        if act != ok:
            raise ValueError(f"qwen3_vl {where}.hidden_act {act!r} is not supported (only {ok})")
    side = math.isqrt(v["num_position_embeddings"])
    assert side * side == v["num_position_embeddings"], "num_position_embeddings must be a square grid"
    section = tuple(rope.get("mrope_section", (24, 20, 20)))
    if sum(section) != t["head_dim"] // 2:
        raise ValueError(f"qwen3_vl mrope_section {list(section)} must sum to head_dim/2 = {t['head_dim'] // 2}")
    vision_rope = v.get("rope_parameters") or {}
    cfg = VLMConfig(
        family="qwen3_vl",
        vision=QwenVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                                num_layers=v["depth"], num_heads=v["num_heads"], patch_size=v["patch_size"],
                                temporal_patch_size=v["temporal_patch_size"], merge_size=v["spatial_merge_size"],
                                window_size=0, full_attention_layers=tuple(range(v["depth"])),  # no windows
                                out_hidden_size=v["out_hidden_size"], tokens_per_second=0,  # time is in the prompt
                                rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
                                num_position_embeddings=v["num_position_embeddings"],
                                deepstack_layers=tuple(v["deepstack_visual_indexes"])),
        text=TextConfig(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                        intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
                        num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
                        head_dim=t["head_dim"], rope_theta=float(rope.get("rope_theta", t["rope_theta"])),
                        rope_factor=1.0, eps=t["rms_norm_eps"], qkv_bias=False, mrope_section=section,
                        mrope_interleaved=True, qk_norm=True),  # interleaved whatever the config flag says
        video_token_id=raw.get("video_token_id", 151656),
        image_token_id=raw.get("image_token_id", 151655),
        feature_layers=[], select_strategy="full",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False) or text_raw.get("tie_word_embeddings", False)),
        raw=raw,
    )
    assert cfg.text.num_heads % cfg.text.num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert cfg.vision.hidden_size % cfg.vision.num_heads == 0 and cfg.vision.out_hidden_size == cfg.text.hidden_size
    assert len(cfg.vision.deepstack_layers) <= cfg.text.num_layers, "more DeepStack levels than LM layers"
    return cfg

# -----------------------------------------------------------------------------
# vision tower (SigLIP / CLIP share the block)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.k_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.v_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_impl = "auto"  # kernels.attention's impl; VLM.set_attn_impl sets every layer's

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = (proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, nh, N, hd)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        o = attention(q, k, v, causal=False, impl=self.attn_impl)  # bidirectional, no mask
        return self.out_proj(o.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = quick_gelu if c.act == "quick_gelu" else lambda x: F.gelu(x, approximate="tanh")
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.mlp = VisionMLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        clip = c.kind == "clip"
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size, bias=not clip)
        self.position_embedding = nn.Embedding(c.grid ** 2 + clip, c.hidden_size)  # CLIP: row 0 is the CLS slot
        if clip:
            self.class_embedding = nn.Parameter(torch.empty(c.hidden_size))

    def forward(self, pixels):  # (N, 3, S, S) -> (N, P(+1), D)
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight


class VisionEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.num_layers))


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        if c.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.eps)  # sic: the checkpoint's spelling
        self.encoder = VisionEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.eps)  # loaded and saved, unused by LLaVA

    def forward(self, pixels, layer_indices):
        """Hidden states at `layer_indices` of the list [embeddings, layer 1 out, ..., layer L out],
        concatenated on the feature dim. Layers past the deepest one asked for are not run."""
        L = len(self.encoder.layers)
        wanted = [i % (L + 1) for i in layer_indices]  # -1 -> L, -2 -> L-1
        x = self.embeddings(pixels)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)], start=1):
            x = layer(x)
            states[i] = x
        return torch.cat([states[i] for i in wanted], dim=-1)


class Projector(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # exact erf GELU

# -----------------------------------------------------------------------------
# decoder LM (Qwen2 / Llama share it)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)  # cast back, then scale: the HF order


def rope_cos_sin(position_ids, c, dtype):
    """cos, sin (B, T, hd) for rotate-half RoPE with +theta; inverse frequencies in fp32. position_ids (B, T), or
    (3, B, T) (t, h, w) for multimodal RoPE: frequency pair i takes its angle from the axis its mrope_section chunk
    names (chunks t, h, w in turn), so equal t = h = w (text) gives plain RoPE. mrope_interleaved (Qwen3-VL): pair i
    turns with h if i % 3 == 1 and i < 3·section[1], with w if i % 3 == 2 and i < 3·section[2], else with t."""
    exponent = torch.arange(0, c.head_dim, 2, device=position_ids.device).float() / c.head_dim
    inv_freq = 1.0 / (c.rope_theta ** exponent) / c.rope_factor  # linear scaling divides positions by the factor
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2) or (3, B, T, hd/2)
    if position_ids.dim() == 3 and c.mrope_interleaved:
        axis = torch.zeros(freqs.shape[-1], dtype=torch.long, device=freqs.device)  # which of t, h, w per pair
        axis[1:3 * c.mrope_section[1]:3] = 1
        axis[2:3 * c.mrope_section[2]:3] = 2
        freqs = freqs.gather(0, axis.expand_as(freqs[:1]))[0]
    elif position_ids.dim() == 3:
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(list(c.mrope_section), -1))], -1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, nh, T, hd)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast q/k are bf16 while the residual stream is fp32
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.eps)
            self.k_norm = RMSNorm(c.head_dim, c.eps)
        self.attn_impl = "auto"  # kernels.attention's impl; VLM.set_attn_impl sets every layer's

    def forward(self, x, cos, sin, layout=None, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.c.num_heads, -1).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.c.num_kv_heads, -1).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.c.num_kv_heads, -1).transpose(1, 2)
        if self.c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None:  # training / scoring: one op that knows causal, padding and prefix-shared pairs
            o = attention(q, k, v, causal=True, layout=layout, impl=self.attn_impl)
        else:  # generate: append to the preallocated cache, attend to every valid slot so far
            k_buf, v_buf, start, mask = cache  # bufs (B, nkv, Tmax, hd); mask (B, 1, T, start+T) bool
            k_buf[:, :, start:start + T] = k
            v_buf[:, :, start:start + T] = v
            o = F.scaled_dot_product_attention(q, k_buf[:, :, :start + T], v_buf[:, :, :start + T],
                                               attn_mask=mask, enable_gqa=True)  # GQA without copying K/V
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # SwiGLU; biases only in the Qwen2.5-VL vision blocks
    def __init__(self, hidden_size, intermediate_size, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.self_attn = SelfAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, layout=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.eps)

# -----------------------------------------------------------------------------
# Qwen2.5-VL vision tower. Input: the processor's flattened patches (N, 3·2·14·14), patches ordered per video as
# (t, h/2, w/2, 2, 2): each run of 4 consecutive patches is one 2x2 block the merger turns into one LM token.
# Attention runs inside segments of that sequence: a window of merge_window² blocks of one frame pair in most
# blocks, a whole frame pair in `full_attention_layers`. We never reorder the sequence (transformers permutes it
# into window order and back); each segment is a gather, and segments of equal length go to kernels.attention as
# one non-causal batch (a handful of calls per block: interior windows, edge windows, frames).


def vision_segments(grid_thw, cfg, windows):
    """grid_thw (n_videos, 3) -> [(m, L) long index tensors]: the patches of each attention segment, m segments of
    length L per tensor, in sequence order. windows=False: one segment per frame pair (t); True: per window of
    merge_window x merge_window merged blocks (edge windows smaller), ordered (t, window row, window col)."""
    m, ws = cfg.merge_size, cfg.merge_window
    ids, offset = [], 0
    for t, h, w in grid_thw.tolist():
        bh, bw = h // m, w // m  # merged blocks per side
        ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(bh), torch.arange(bw), indexing="ij")
        if windows:
            nwh, nww = -(-bh // ws), -(-bw // ws)
            seg = (ti * nwh + hi // ws) * nww + wi // ws
        else:
            seg = ti
        ids.append(seg.flatten() + offset)  # per merged block, in sequence order
        offset += int(seg.max()) + 1
    block_seg = torch.cat(ids)
    order = torch.argsort(block_seg, stable=True)  # blocks grouped by segment, sequence order kept inside
    lengths = torch.bincount(block_seg).tolist()
    patches = (order[:, None] * m * m + torch.arange(m * m)).flatten()  # block -> its m² patches
    groups = {}
    for seg in torch.split(patches, [n * m * m for n in lengths]):
        groups.setdefault(len(seg), []).append(seg)
    return [torch.stack(segs) for segs in groups.values()]


def patchify(frames, c):
    """Preprocessed frames (B, F, 3, H, W), H and W multiples of 28 -> the processor's patches (B, t·h·w, 3·tp·p·p)
    and video_grid_thw (B, 3): F padded to a multiple of the temporal patch by repeating the last frame, then
    patches in (t, h/2, w/2, 2, 2) order, each flattened as (channel, frame, row, column)."""
    B, nf, C, H, W = frames.shape
    tp, p, m = c.temporal_patch_size, c.patch_size, c.merge_size
    if pad := -nf % tp:
        frames = torch.cat([frames, frames[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    t, h, w = frames.shape[1] // tp, H // p, W // p
    x = frames.reshape(B, t, tp, C, h // m, m, p, w // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (B, t, h/m, w/m, m, m, C, tp, p, p)
    return x.reshape(B, t * h * w, C * tp * p * p), torch.tensor([[t, h, w]] * B)


def rotate_fp32(x, cos, sin):
    """Rotate-half RoPE computed in fp32 (as transformers does in the Qwen ViT), returned in x's dtype."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class QwenVisionAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        self.attn_impl = "auto"  # kernels.attention's impl; VLM.set_attn_impl sets every layer's

    def forward(self, x, cos, sin, segments):  # x (N, D), cos/sin (N, 1, hd)
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, nh, hd) each
        q, k = rotate_fp32(q, cos, sin), rotate_fp32(k, cos, sin)
        out = x.new_empty(N, self.num_heads, D // self.num_heads)
        for idx in segments:  # (m, L): m segments of L patches, one batched non-causal call
            o = attention(*(t[idx].transpose(1, 2) for t in (q, k, v)), causal=False, impl=self.attn_impl)
            out[idx] = o.transpose(1, 2)
        return self.proj(out.view(N, D))


class QwenVisionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1 = RMSNorm(c.hidden_size, 1e-6)  # eps fixed in transformers, not in the config
        self.attn = QwenVisionAttention(c)
        self.norm2 = RMSNorm(c.hidden_size, 1e-6)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class QwenVisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(
            3, c.hidden_size, (c.temporal_patch_size, c.patch_size, c.patch_size),
            stride=(c.temporal_patch_size, c.patch_size, c.patch_size), bias=False)))
        self.blocks = nn.ModuleList(QwenVisionBlock(c) for _ in range(c.num_layers))

    def rope(self, grid_thw, device):
        """cos, sin (N, 1, hd) of the 2-D RoPE: the first half of each head's frequency pairs turns with the patch's
        row, the second half with its column (theta over hd/2 dims), in the (t, h/2, w/2, 2, 2) patch order."""
        c, m = self.c, self.c.merge_size
        hd = c.hidden_size // c.num_heads
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, hd // 2, 2, device=device).float() / (hd // 2)))
        rows = []
        for t, h, w in grid_thw.tolist():
            hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
            hw = torch.stack([hh, ww], -1).view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            rows.append(hw.repeat(t, 1))  # (t·h·w, 2) row, column
        hw = torch.cat(rows)
        freqs = torch.cat([hw[:, :1] * inv_freq, hw[:, 1:] * inv_freq], -1)  # (N, hd/2)
        emb = torch.cat([freqs, freqs], -1)[:, None]  # (N, 1, hd)
        return emb.cos(), emb.sin()

    def forward(self, patches, grid_thw):
        """patches (N, 3·tp·p·p), grid_thw (n_videos, 3) -> (N, D) final block outputs (before the merger)."""
        c = self.c
        assert patches.shape[0] == int(grid_thw.prod(-1).sum()), "pixel_values_videos rows != sum of t·h·w"
        conv = self.patch_embed.proj  # kernel = stride = one patch: a matmul, run as the conv for transformers' sums
        x = conv(patches.to(conv.weight.dtype).view(-1, 3, *conv.kernel_size)).flatten(1)  # (N, D)
        cos, sin = self.rope(grid_thw, x.device)
        windows = [s.to(x.device) for s in vision_segments(grid_thw, c, windows=True)]
        frames = [s.to(x.device) for s in vision_segments(grid_thw, c, windows=False)]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in c.full_attention_layers else windows)
        return x


class QwenMerger(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_q = RMSNorm(c.hidden_size, 1e-6)
        wide = c.hidden_size * c.merge_size ** 2
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(), nn.Linear(wide, c.out_hidden_size))  # erf GELU

    def forward(self, x):  # (N, D) -> (N / m², H): each run of m² patches (one 2x2 block) becomes one token
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))

# -----------------------------------------------------------------------------
# Qwen3-VL vision tower: the Qwen2.5-VL patch order, 2-D RoPE and frame segments, with LayerNorm / tanh-GELU blocks,
# 16-pixel patches (a conv with bias), learned position embeddings resampled to each frame's grid, attention over the
# whole frame pair in every block (no windows), and DeepStack: the outputs of `deepstack_layers` blocks, each through
# its own patch merger, are added to the LM's hidden states at the video positions after its first layers.


class Qwen3MLP(nn.Module):  # the blocks' MLP (tanh GELU); with a LayerNorm in front, a patch merger (erf GELU)
    def __init__(self, dim, hidden, out, approximate):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, out)
        self.approximate = approximate

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class Qwen3Merger(Qwen3MLP):
    def __init__(self, c, postshuffle):
        wide = c.hidden_size * c.merge_size ** 2
        super().__init__(wide, wide, c.out_hidden_size, "none")
        self.postshuffle = postshuffle  # DeepStack mergers normalise the joined m² patches, the final one each patch
        self.norm = nn.LayerNorm(wide if postshuffle else c.hidden_size, eps=1e-6)

    def forward(self, x):  # (N, D) -> (N / m², H): each run of m² patches (one 2x2 block) becomes one token
        wide = self.linear_fc1.in_features
        x = self.norm(x.view(-1, wide)) if self.postshuffle else self.norm(x).view(-1, wide)
        return super().forward(x)


class Qwen3VisionBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=1e-6)  # eps fixed in transformers, not in the config
        self.attn = QwenVisionAttention(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.mlp = Qwen3MLP(c.hidden_size, c.intermediate_size, c.hidden_size, "tanh")

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class Qwen3VisionTransformer(nn.Module):
    rope = QwenVisionTransformer.rope  # the same 2-D RoPE: rows then columns, in the (t, h/2, w/2, 2, 2) order

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(
            3, c.hidden_size, (c.temporal_patch_size, c.patch_size, c.patch_size),
            stride=(c.temporal_patch_size, c.patch_size, c.patch_size))))
        self.pos_embed = nn.Embedding(c.num_position_embeddings, c.hidden_size)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(c) for _ in range(c.num_layers))
        self.deepstack_merger_list = nn.ModuleList(Qwen3Merger(c, postshuffle=True) for _ in c.deepstack_layers)

    def position_embeddings(self, grid_thw):
        """(N, D): the side x side learned grid resized to each video's h x w patches (bilinear, corners aligned),
        in the (t, h/2, w/2, 2, 2) patch order, the same for every frame pair."""
        c, m = self.c, self.c.merge_size
        side = math.isqrt(c.num_position_embeddings)
        table = self.pos_embed.weight.view(side, side, -1).permute(2, 0, 1)[None]  # (1, D, side, side)
        rows = []
        for t, h, w in grid_thw.tolist():
            grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]  # (D, h, w)
            grid = grid.permute(1, 2, 0).reshape(h // m, m, w // m, m, -1).transpose(1, 2).reshape(h * w, -1)
            rows.append(grid.repeat(t, 1))
        return torch.cat(rows)

    def forward(self, patches, grid_thw):
        """patches (N, 3·tp·p·p), grid_thw (n_videos, 3) -> (N, D) last block outputs (before the merger) and the
        DeepStack features [(N/m², H)], one per deepstack layer in block order."""
        c = self.c
        assert patches.shape[0] == int(grid_thw.prod(-1).sum()), "pixel_values_videos rows != sum of t·h·w"
        conv = self.patch_embed.proj  # kernel = stride = one patch
        x = conv(patches.to(conv.weight.dtype).view(-1, 3, *conv.kernel_size)).flatten(1)  # (N, D)
        x = x + self.position_embeddings(grid_thw).to(x.dtype)
        cos, sin = self.rope(grid_thw, x.device)
        frames = [s.to(x.device) for s in vision_segments(grid_thw, c, windows=False)]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames)
            if i in c.deepstack_layers:
                deepstack.append(self.deepstack_merger_list[c.deepstack_layers.index(i)](x))
        return x, deepstack

# -----------------------------------------------------------------------------
# the VLM


class VLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        if c.family == "qwen3_vl":  # the ViT with its DeepStack mergers; the final 2x2 patch merger is the projector
            self.vision_tower = Qwen3VisionTransformer(c.vision)
            self.multi_modal_projector = Qwen3Merger(c.vision, postshuffle=False)
        elif c.family == "qwen2_5_vl":  # the ViT; its 2x2 patch merger plays the projector
            self.vision_tower = QwenVisionTransformer(c.vision)
            self.multi_modal_projector = QwenMerger(c.vision)
        else:
            self.vision_tower = nn.ModuleDict(dict(vision_model=VisionTransformer(c.vision)))
            self.multi_modal_projector = Projector(c.vision.hidden_size * len(c.feature_layers), c.text.hidden_size)
            # OV appends it once per video after the last frame; NV stores it for images only (unused here)
            self.image_newline = nn.Parameter(torch.empty(c.text.hidden_size))
        lm = dict(model=TextModel(c.text))
        if not c.tie_word_embeddings:
            lm["lm_head"] = nn.Linear(c.text.hidden_size, c.text.vocab_size, bias=False)
        self.language_model = nn.ModuleDict(lm)
        self.source_dir = None  # where from_pretrained read us: tokenizer files are copied from there on save

    @property
    def lm_head_weight(self):  # (V, H)
        lm = self.language_model
        return lm.lm_head.weight if "lm_head" in lm else lm.model.embed_tokens.weight

    def tokens_per_frame(self):
        g = self.config.vision.grid
        return math.ceil(g / 2) ** 2 if self.config.family == "llava_onevision" else (g // 2) ** 2

    def num_video_tokens(self, num_frames):
        """How many <video> ids one video expands to: OV F·⌈g/2⌉²+1 (one newline), NV F·⌊g/2⌋². Qwen2.5-VL, for
        frames of the fixed side S = vision.image_size: ⌈F/2⌉ frame pairs x (S/28)² merged blocks (Qwen3-VL:
        (S/32)²)."""
        c = self.config
        if c.family in QWEN_FAMILIES:
            side = c.vision.image_size // (c.vision.patch_size * c.vision.merge_size)
            return -(-num_frames // c.vision.temporal_patch_size) * side * side
        return num_frames * self.tokens_per_frame() + (c.family == "llava_onevision")

    def video_features(self, pixel_values_videos, video_grid_thw=None):
        """(B, F, 3, S, S) preprocessed frames -> (B, num_video_tokens(F), H) rows for the <video> positions.
        Qwen2.5-VL also takes the processor's patches (N, 3·2·14·14) with video_grid_thw (n, 3) -> (N/4, H).
        Qwen3-VL (patches 3·2·16·16): rows of (1 + K)·H, the merged tokens then the K DeepStack levels, so one
        tensor carries all the video's features; `embed_with_deepstack` splits them."""
        c = self.config
        if c.family in QWEN_FAMILIES:
            B = pixel_values_videos.shape[0]
            patches, grid = pixel_values_videos, video_grid_thw
            if pixel_values_videos.dim() == 5:
                patches, grid = patchify(pixel_values_videos, c.vision)
            elif grid is None:
                raise ValueError("pixel_values_videos as flattened patches needs video_grid_thw (the processor's)")
            x = self.vision_tower(patches.flatten(0, -2), grid)
            if c.family == "qwen3_vl":  # (N/m², (1 + K)·H)
                x = torch.cat([self.multi_modal_projector(x[0]), *x[1]], dim=-1)
            else:
                x = self.multi_modal_projector(x)  # (N/m², H)
            return x.view(B, -1, x.shape[-1]) if pixel_values_videos.dim() == 5 else x
        B, nf = pixel_values_videos.shape[:2]
        x = self.vision_tower.vision_model(pixel_values_videos.flatten(0, 1), c.feature_layers)  # (B·F, P, Dv)
        if c.select_strategy == "default":
            x = x[:, 1:]  # drop CLS
        g = c.vision.grid
        assert x.shape[1] == g * g, f"vision tower gave {x.shape[1]} patches, expected {g}x{g}"
        if c.family == "llava_onevision":  # projector first, then a bilinear *resize* to ⌈g/2⌉²
            x = self.multi_modal_projector(x).view(B * nf, g, g, -1).permute(0, 3, 1, 2)  # (B·F, H, g, g)
            x = F.interpolate(x, size=(math.ceil(g / 2),) * 2, mode="bilinear", align_corners=False)
            x = x.permute(0, 2, 3, 1).reshape(B, -1, x.shape[1])  # (B, F·s², H)
            return torch.cat([x, self.image_newline.to(x.dtype).expand(B, 1, -1)], dim=1)
        # llava_next_video: 2x2 average pooling on the vision features, then the projector
        x = x.view(B * nf, g, g, -1).permute(0, 3, 1, 2)
        x = F.avg_pool2d(x, kernel_size=2, stride=2).flatten(2).transpose(1, 2)  # (B·F, (g/2)², Dv)
        return self.multi_modal_projector(x).reshape(B, -1, self.config.text.hidden_size)

    def embed(self, input_ids, pixel_values_videos=None, video_features=None, video_grid_thw=None):
        """Token embeddings with video feature rows scattered, in row-major order, into the <video> positions."""
        return self.embed_with_deepstack(input_ids, pixel_values_videos, video_features, video_grid_thw)[0]

    def embed_with_deepstack(self, input_ids, pixel_values_videos=None, video_features=None, video_grid_thw=None):
        """(`embed`'s embeddings, deepstack): Qwen3-VL's (is_video (B, T), [K (n, H)]) for `decode`, else None."""
        x = self.language_model.model.embed_tokens(input_ids)  # (B, T, H)
        is_video = input_ids == self.config.video_token_id
        if video_features is None and pixel_values_videos is not None:
            video_features = self.video_features(pixel_values_videos, video_grid_thw)
        n_slots = int(is_video.sum())
        n_rows = 0 if video_features is None else video_features.numel() // video_features.shape[-1]
        if n_slots != n_rows:
            raise ValueError(f"input_ids hold {n_slots} video tokens but the videos give {n_rows} feature rows; "
                             f"expand <video> to model.num_video_tokens(num_frames) ids per video")
        deepstack = None
        if n_rows:
            rows = video_features.reshape(n_rows, -1).to(x.dtype)
            H = x.shape[-1]
            x = x.masked_scatter(is_video[..., None], rows[:, :H].contiguous())
            if rows.shape[1] > H:  # Qwen3-VL's DeepStack levels ride behind the merged tokens
                deepstack = (is_video, rows[:, H:].split(H, dim=-1))
        return x, deepstack

    def forward(self, input_ids, pixel_values_videos=None, position_ids=None, layout=None, video_features=None,
                return_hidden=False, video_grid_thw=None, second_per_grid_ts=None):
        """Logits (B, T, V), or final-normed hidden states (B, T, H) with return_hidden=True.
        position_ids (B, T) default 0..T-1 (the caller restarts them for prefix-shared branches);
        layout (B, 1 + 3K) rows [S, q1, c1, r1, ...] or (B, 3) pairs [P, C, R], as in kernels.attention (None:
        plain causal). Qwen2.5-VL: video_grid_thw / second_per_grid_ts as the processor gives them (derived from
        (B, F, 3, S, S) frames when absent; 1 s per frame pair when absent), and position_ids become the 3-D
        multimodal ones (`mrope_positions`)."""
        x, deepstack = self.embed_with_deepstack(input_ids, pixel_values_videos, video_features, video_grid_thw)
        if position_ids is None:
            position_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        if self.config.family in QWEN_FAMILIES:
            grid = video_grid_thw if video_grid_thw is not None else self.frames_grid(pixel_values_videos, input_ids)
            position_ids = self.mrope_positions(input_ids, position_ids, grid, second_per_grid_ts)
        h = self.decode(x, position_ids, layout, deepstack=deepstack)
        return h if return_hidden else F.linear(h, self.lm_head_weight)

    def frames_grid(self, pixel_values_videos, input_ids):
        """video_grid_thw of the fixed-size path: every video has ⌈F/2⌉ frame pairs of S/14 x S/14 patches, with F
        from (B, F, 3, S, S) frames, or (video features passed instead) from num_video_tokens at S = image_size."""
        c = self.config.vision
        if pixel_values_videos is not None and pixel_values_videos.dim() == 5:
            B, nf, _, H, W = pixel_values_videos.shape
            t, h, w = -(-nf // c.temporal_patch_size), H // c.patch_size, W // c.patch_size
        else:
            h = w = c.image_size // c.patch_size
            per_t = h * w // c.merge_size ** 2
            n = int((input_ids == self.config.video_token_id).sum(1).max())
            B, t = int((input_ids == self.config.video_token_id).any(1).sum()), n // per_t
        return torch.tensor([[t, h, w]] * B)

    def mrope_positions(self, input_ids, position_ids, video_grid_thw, second_per_grid_ts=None):
        """(B, T) positions -> (3, B, T) (t, h, w) multimodal RoPE positions, as transformers 5.24's get_rope_index:
        a video starting at position s gets t = s + ⌊i·tokens_per_second·second_per_grid_ts⌋ for frame pair i,
        h = s + row, w = s + column (in merged blocks); text after it continues from s + max(rows, columns) (not
        from the largest position: 5.24's rule); text before it keeps its position. Videos take their grids in
        row-major order of their tokens. Works on packed rows too: branch positions restarted by the caller after
        the prefix get the same shift as the text right after the video."""
        c = self.config.vision
        if self.config.family == "qwen3_vl":  # 5.24: each frame pair its own grid (t = 1), as the processor puts a
            # timestamp between frame pairs; time lives in that text, so a frame's t position is its start
            video_grid_thw = video_grid_thw.repeat_interleave(video_grid_thw[:, 0], dim=0)
            video_grid_thw[:, 0] = 1
        is_video = input_ids == self.config.video_token_id
        p = position_ids.expand(input_ids.shape)
        if not bool(is_video.any()):
            return p[None].expand(3, -1, -1)
        video_pos = p[None].repeat(3, 1, 1)  # (3, B, T); only the video slots are used
        shift = torch.zeros_like(p)  # what each token's position gains from the videos before it
        rows, cols = is_video.nonzero(as_tuple=True)  # row-major: the order the features are scattered in
        seconds = [1.0] * len(video_grid_thw) if second_per_grid_ts is None else second_per_grid_ts
        offset = 0
        for (t, h, w), sec in zip(video_grid_thw.tolist(), seconds):
            h, w = h // c.merge_size, w // c.merge_size
            n = t * h * w
            b, at = rows[offset:offset + n], cols[offset:offset + n]
            assert n and bool((b == b[0]).all()), "a video's tokens must lie in one row"
            b, first = int(b[0]), int(at[0])
            start = int(p[b, first] + shift[b, first])
            # the temporal step in fp32, truncated after the multiply, as the processor's float32 tensors give it
            step = torch.as_tensor(sec, dtype=torch.float32) * c.tokens_per_second
            tt = (torch.arange(t) * step).long()
            grid = torch.stack(torch.meshgrid(tt, torch.arange(h), torch.arange(w), indexing="ij")).view(3, -1)
            video_pos[:, b, at] = (grid + start).to(p.device)
            shift[b] += torch.where(p[b] >= p[b, first] + n, max(h, w) - n, 0)
            offset += n
        assert offset == len(rows), f"input_ids hold {len(rows)} video tokens, video_grid_thw covers {offset}"
        return torch.where(is_video, video_pos, p + shift)

    def decode(self, x, position_ids, layout=None, caches=None, deepstack=None):
        """deepstack (Qwen3-VL, from `embed`): level i is added at the video positions after LM layer i."""
        lm = self.language_model.model
        cos, sin = rope_cos_sin(position_ids, self.config.text, x.dtype)
        for i, layer in enumerate(lm.layers):
            x = layer(x, cos, sin, layout, None if caches is None else caches[i])
            if deepstack is not None and i < len(deepstack[1]):
                is_video, levels = deepstack
                x = x.masked_scatter(is_video[..., None], x[is_video] + levels[i])
        return lm.norm(x)

    @torch.no_grad()
    def generate(self, prompts, pixel_values_videos=None, video_features=None, max_new_tokens=64, temperature=0.0,
                 top_p=1.0, stop_ids=(), seed=None, video_grid_thw=None, second_per_grid_ts=None):
        """Batched generation with a KV cache. prompts: list of token-id lists (left-padded here; a video row holds
        num_video_tokens ids). Greedy when temperature == 0, else temperature + nucleus (top_p) sampling.
        Returns each row's new ids, the stop token excluded. seed: an int (one random stream for the batch) or a list
        of one per prompt (each row its own stream: its sample does not depend on what it is batched with).
        Qwen-VL: 3-D positions for the prompt; each new token takes the row's largest position + 1 (transformers'
        rope delta)."""
        device, dtype = self.lm_head_weight.device, self.lm_head_weight.dtype
        B, T0 = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, T0, dtype=torch.long, device=device)
        valid = torch.zeros(B, T0 + max_new_tokens, dtype=torch.bool, device=device)  # real (non-pad) key slots
        for i, p in enumerate(prompts):
            ids[i, T0 - len(p):] = torch.tensor(p, device=device)
            valid[i, T0 - len(p):T0] = True
        x, deepstack = self.embed_with_deepstack(ids, pixel_values_videos, video_features, video_grid_thw)
        positions = (valid[:, :T0].long().cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
        if self.config.family in QWEN_FAMILIES:
            grid = video_grid_thw if video_grid_thw is not None else self.frames_grid(pixel_values_videos, ids)
            positions = self.mrope_positions(ids, positions, grid, second_per_grid_ts)  # (3, B, T0)
        c = self.config.text
        kv = [(torch.empty(B, c.num_kv_heads, T0 + max_new_tokens, c.head_dim, device=device, dtype=dtype),
               torch.empty(B, c.num_kv_heads, T0 + max_new_tokens, c.head_dim, device=device, dtype=dtype))
              for _ in range(c.num_layers)]
        # prefill mask: causal over real keys; a pad query sees itself only, so no row is empty (no NaN)
        causal = torch.ones(T0, T0, dtype=torch.bool, device=device).tril()
        mask = (causal & valid[:, None, :T0]) | torch.eye(T0, dtype=torch.bool, device=device)
        if isinstance(seed, (list, tuple)):
            generator = [torch.Generator(device).manual_seed(s) for s in seed]
        else:
            generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        out, done = [[] for _ in range(B)], [False] * B
        start, last_pos = 0, positions.amax(dim=-1) if positions.dim() == 2 else positions.amax(dim=(0, 2))
        for _ in range(max_new_tokens):
            caches = [(k, v, start, mask[:, None]) for k, v in kv]
            h = self.decode(x, positions, caches=caches, deepstack=deepstack)[:, -1]  # (B, H)
            deepstack = None  # the prompt's only
            next_ids = sample(F.linear(h, self.lm_head_weight).float(), temperature, top_p, generator)
            for i, token in enumerate(next_ids.tolist()):  # one host sync per step, not one per row
                if not done[i]:
                    if token in stop_ids:
                        done[i] = True
                    else:
                        out[i].append(token)
            if all(done):
                break
            start += x.shape[1]
            valid[:, start] = True
            mask = valid[:, None, :start + 1]  # (B, 1, start+1): the new token sees every real slot
            last_pos = last_pos + 1
            positions = last_pos[:, None]
            x = self.language_model.model.embed_tokens(next_ids[:, None])
        return out

    # -------------------------------------------------------------------------
    # checkpoints

    @classmethod
    def on_meta(cls, path):
        """(model on `meta`, sources {our name: (file, stored key)}, headers) for a checkpoint directory: config.json
        read, every stored name mapped to ours and every shape checked; no tensor data read. from_pretrained fills
        it; so does load_sharded after FSDP2 has sharded it."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"no config.json in {path!r}: point at a Hugging Face checkpoint directory")
        with open(config_path) as f:
            raw = json.load(f)
        config = parse_config(raw)
        headers = checkpoint_headers(path)  # file -> (header, data offset); names and shapes only, no data read
        sources = {canonical_name(key, config.family): (file, key)
                   for file, (header, _) in headers.items() for key in header}
        sources.pop(None, None)  # skipped names (rotary inv_freq buffers)
        # a head stored for a tied model is ignored (transformers ties anyway); no head stored means tied
        config.tie_word_embeddings = config.tie_word_embeddings or "language_model.lm_head.weight" not in sources
        if config.tie_word_embeddings:
            sources.pop("language_model.lm_head.weight", None)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing, extra = sorted(set(expected) - set(sources)), sorted(set(sources) - set(expected))
        if missing or extra:
            raise ValueError(f"checkpoint {path!r} does not match a {config.family} model: "
                             f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected tensors {extra[:8]}{'...' if len(extra) > 8 else ''}")
        for name, (file, key) in sources.items():
            shape = tuple(headers[file][0][key]["shape"])
            if shape != expected[name]:
                raise ValueError(f"tensor {key!r} in {os.path.basename(file)} has shape {shape}, "
                                 f"expected {expected[name]} from config.json")
        model.source_dir = path
        return model, sources, headers

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, attn_impl="auto"):
        """Load a Hugging Face checkpoint directory. Built on `meta`, tensors read one at a time and assigned
        (peak memory ≈ one copy of the weights in `dtype`, plus the largest tensor). attn_impl: kernels.attention's
        impl for every layer ("auto", "triton", "sdpa")."""
        model, sources, headers = cls.on_meta(path)
        state = {name: t.to(device=device, dtype=dtype) for name, t in read_checkpoint(sources, headers)}
        model.load_state_dict(state, assign=True, strict=True)
        model.set_attn_impl(attn_impl)
        return model.eval()

    def set_attn_impl(self, impl):
        """kernels.attention's impl in every attention layer: "auto" (Triton on CUDA, the reference on CPU), "triton",
        or "sdpa" (PyTorch SDPA for every layout: the fallback if the Triton kernels misbehave on a GPU)."""
        from kernels import IMPLS
        if impl not in IMPLS:
            raise ValueError(f"attn_impl {impl!r} is not one of {', '.join(IMPLS)}")
        for module in self.modules():
            if hasattr(module, "attn_impl"):
                module.attn_impl = impl
        return self

    def save_pretrained(self, path, max_shard_bytes=4 * 2**30, dtype=None):
        """Write an HF checkpoint dir (4.x hub key layout) that transformers and from_pretrained load; atomic.
        dtype: cast floating-point tensors to it on the way out (None: as they are)."""
        tmp = path.rstrip("/") + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
        state = {hub_name(k, self.config.family): cast(v.detach().cpu()).contiguous()
                 for k, v in self.state_dict().items()}
        shards, size = [{}], 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if size + nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        raw = dict(self.config.raw)
        raw["tie_word_embeddings"] = self.config.tie_word_embeddings
        raw["dtype"] = str(state[next(k for k in state if state[k].is_floating_point())].dtype).removeprefix("torch.")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(raw, f, indent=2)
        for name in SIDE_FILES:
            if self.source_dir and os.path.isfile(os.path.join(self.source_dir, name)):
                shutil.copy(os.path.join(self.source_dir, name), tmp)
        if os.path.exists(path):  # swap in the new dir, then drop the old one
            old = path.rstrip("/") + f".old{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)


def sample(logits, temperature, top_p, generator=None):
    """(B, V) fp32 logits -> (B,) ids. Greedy at temperature 0; else softmax(l/T) restricted to the top-p nucleus,
    drawn with `generator` (one torch.Generator, or a list of one per row)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if isinstance(generator, (list, tuple)):  # one generator per row: a row's draws do not depend on its batch
        return torch.cat([sample(row[None], temperature, top_p, g) for row, g in zip(logits, generator)])
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


QWEN_NAMES = (("visual.merger.", "multi_modal_projector."), ("visual.", "vision_tower."),
              ("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))  # 4.x hub -> ours
QWEN3_NAMES = (("model.visual.merger.", "multi_modal_projector."), ("model.visual.", "vision_tower."),
               ("model.language_model.", "language_model.model."),
               ("lm_head.", "language_model.lm_head."))  # Qwen3-VL's hub files (4.57+) and transformers 5 -> ours


def canonical_name(key, family="llava_onevision"):
    """Map a stored tensor name from any of the layouts to our module name; None to skip it."""
    if key.endswith("rotary_emb.inv_freq") or key.endswith("rotary_pos_emb.inv_freq"):
        return None
    if family in QWEN_FAMILIES:  # transformers 5: model.visual.*, model.language_model.*; 4.49+: visual.*, model.*
        if key.startswith(("model.visual.", "model.language_model.")):
            key = key[len("model."):].replace("language_model.", "model.", 1)
        for hub, ours in QWEN_NAMES:
            if key.startswith(hub):
                return ours + key[len(hub):]
        return key
    if key.startswith("model."):  # 4.52+ layout: model.language_model.*, model.vision_tower.*, ...
        key = key[len("model."):]
        if key.startswith("language_model."):
            key = "language_model.model." + key[len("language_model."):]
    if key.startswith("lm_head."):
        key = "language_model." + key
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]  # transformers 5 save layout
    return key


def hub_name(name, family):
    """Our module name -> the name save_pretrained writes (the 4.x hub layout, which transformers 5 also writes;
    Qwen3-VL: its hub layout, model.visual.* / model.language_model.*)."""
    if family in QWEN_FAMILIES:
        for hub, ours in QWEN3_NAMES if family == "qwen3_vl" else QWEN_NAMES:
            if name.startswith(ours):
                return hub + name[len(ours):]
    return name


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def safetensors_header(file):
    """(header {name: {dtype, shape, data_offsets}}, byte offset of the data) of a .safetensors file."""
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ValueError(f"{file!r} is not a readable safetensors file ({e}); re-download it") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def read_checkpoint(sources, headers):
    """(our name, tensor in its stored dtype) for every tensor of `sources`, file by file, one tensor at a time."""
    for file, (header, data_start) in headers.items():
        with open(file, "rb") as f:
            for name, (src, key) in sources.items():
                if src == file:
                    yield name, read_tensor(f, header[key], data_start)


def load_sharded(model, sources, headers, device, dtype=torch.float32):
    """Fill a model built by VLM.on_meta whose parameters FSDP2 has sharded (fully_shard on `meta`): storage is made
    on `device`, then each rank reads each full tensor, keeps its own shard and drops the rest, so a rank's peak host
    memory is its shard plus the largest tensor, not the whole model. Every rank calls this (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in read_checkpoint(sources, headers):
            p, full = params[name], full.to(device=device, dtype=dtype)
            if isinstance(p, DTensor):  # src_data_rank=None: slice locally, every rank holds the same full tensor
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
            else:
                p.copy_(full)
            del full
    return model


def read_tensor(f, info, data_start):
    """Read one tensor straight into fresh memory: no mmap, so peak memory is the weights plus one tensor."""
    begin, end = info["data_offsets"]
    t = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
    buf = t.reshape(-1).view(torch.uint8).numpy()
    f.seek(data_start + begin)
    if f.readinto(buf) != end - begin or buf.nbytes != end - begin:
        raise ValueError(f"{f.name!r} is truncated or corrupt: re-download it")
    return t


def checkpoint_headers(path):
    """file -> (header, data offset) for a single-file or sharded safetensors checkpoint directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ValueError(f"checkpoint {path!r}: shard(s) {missing} listed in model.safetensors.index.json "
                             f"are missing; re-download them")
        files = [os.path.join(path, s) for s in files]
    elif os.path.isfile(single):
        files = [single]
    else:
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path!r} "
                         f"(only safetensors checkpoints are read)")
    return {file: safetensors_header(file) for file in files}


def init_weights(model, seed=0):
    """Random init at a visible scale (weights ~ N(0, 1/fan_in), norms ~ U(0.5, 1.5)) for demos and tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 if "bias" in name else torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model


def stored_dtype(raw_config):
    """The dtype a checkpoint was stored in, from its config.json dict (`dtype`, or 4.x `torch_dtype`); fp32 if
    unstated. Exports default to it, so a bf16 hub model trained in fp32 is written back in bf16."""
    name = str(raw_config.get("dtype") or raw_config.get("torch_dtype") or "float32")
    return DTYPES.get(name, torch.float32)


# -----------------------------------------------------------------------------
# where the model runs: one device/dtype resolution and one torchrun setup for every script

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_runtime(device="auto", dtype="float32", timeout_minutes=30):
    """(rank, world, torch.device, torch.dtype) of this process. Under torchrun (WORLD_SIZE > 1) the process group is
    initialised here: NCCL on CUDA, gloo on CPU. device: "auto" = cuda:LOCAL_RANK when CUDA is available, else cpu;
    "cuda" = cuda:LOCAL_RANK; anything else as given. `timeout_minutes` bounds a collective: scripts whose ranks meet
    only at the end (describe, bench) pass hours."""
    import datetime

    import torch.distributed as dist
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local}"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world, device, DTYPES[dtype]


if __name__ == "__main__":
    # smoke run: python model.py CKPT_DIR -> one forward on random frames and one short greedy generation
    import sys
    model = VLM.from_pretrained(sys.argv[1])
    S, nf = model.config.vision.image_size, 2
    n = model.num_video_tokens(nf)
    ids = torch.tensor([[1, 2] + [model.config.video_token_id] * n + [3, 4]])
    pixels = torch.randn(1, nf, 3, S, S)
    logits = model(ids, pixels)
    print(f"{model.config.family}: logits {tuple(logits.shape)}, {sum(p.numel() for p in model.parameters()):,} params")
    print("generated ids:", model.generate([ids[0].tolist()], pixels, max_new_tokens=8)[0])
