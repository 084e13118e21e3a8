"""
LoRA (Hu et al. 2021, arXiv 2106.09685) on the VLM's nn.Linear layers, saved and loaded in PEFT's file format.

    from lora import add_lora, adapters_disabled, save_adapter, load_adapter, merge_lora
    add_lora(vlm, rank=16, alpha=32)          # all weights frozen; A, B fp32 and trainable; B = 0: output unchanged
    with adapters_disabled(vlm): ...          # the base model from the same module (DPO's reference, for free)
    save_adapter(vlm, "out/final_adapter")    # adapter_config.json + adapter_model.safetensors, named as PEFT names
    load_adapter(vlm, "out/final_adapter")    # ours, or any PEFT LoRA adapter for the same transformers class
    merge_lora(vlm)                           # W += (alpha/r)·B·A in place; a plain VLM again

An adapted nn.Linear keeps its class, name and weight. It gains two children, `lora_A` (r, in) and `lora_B` (out, r),
and a forward hook that adds scale·B(A(dropout(x))) to its output, scale = alpha / r (alpha / √r with rslora). So the
state dict keeps every checkpoint name, from_pretrained / save_pretrained / FSDP wrapping are untouched, and the new
names end in `.lora_A.weight` / `.lora_B.weight`, PEFT's own suffixes. The (out, in) product B·A is formed only when
merging: in training the low-rank path costs r values per token per layer.

PEFT names a tensor by the transformers 5 module path under `base_model.model.`:
`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight` for our
`language_model.model.layers.0.self_attn.q_proj.lora_A.weight` (`hf_name`). Reading goes through
model.canonical_name, so adapters saved against the transformers 4.x layout load too. Modules trained whole (the
projector, `train_projector`) are PEFT's `modules_to_save`: stored whole under their own names. `image_newline` is a
bare parameter that PEFT cannot save on its own, so it stays frozen under LoRA.
"""
import contextlib
import json
import math
import os
import re
import shutil

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model import QWEN3_NAMES, QWEN_FAMILIES, canonical_name, read_tensor, safetensors_header

# q/k/v/o and the MLP of every decoder layer; a regex matched in full against our module names
TARGETS = r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
PEFT_PREFIX = "base_model.model."
# our module-name prefix -> the transformers 5 module path (what PEFT sees); canonical_name is the inverse
HF_PREFIXES = [("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
               ("vision_tower.vision_model.", "model.vision_tower."),
               ("multi_modal_projector", "model.multi_modal_projector"), ("image_newline", "model.image_newline")]
HF_CLASSES = {"llava_onevision": ("LlavaOnevisionForConditionalGeneration", "llava_onevision"),
              "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "llava_next_video"),
              "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
              "qwen3_vl": ("Qwen3VLForConditionalGeneration", "qwen3_vl")}


def hf_name(name, family="llava_onevision"):
    """Our module or tensor name -> transformers 5's (model.canonical_name maps it back). The Qwen families'
    transformers 5 paths (model.visual.*, model.language_model.*, lm_head) are Qwen3-VL's hub names."""
    if family in QWEN_FAMILIES:
        for hub, ours in QWEN3_NAMES:  # prefixes end in "." and so may whole module names here
            if (name + ".").startswith(ours):
                return (hub + name[len(ours):]) if len(name) >= len(ours) else hub.rstrip(".")
    for ours, theirs in HF_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"no transformers name for {name!r}")


def _lora_forward(linear, args, out):
    """Forward hook of an adapted nn.Linear: out + scale·B(A(dropout(x)))."""
    settings = linear.lora_settings
    if not settings["enabled"]:
        return out
    x = F.dropout(args[0], settings["dropout"], linear.training)
    return out + (linear.lora_B(linear.lora_A(x.to(linear.lora_A.weight.dtype))) * settings["scale"]).to(out.dtype)


def add_lora(vlm, rank, alpha, dropout=0.0, targets=TARGETS, modules_to_save=(), frozen_dtype=None, rslora=False,
             seed=0):
    """Adapt the nn.Linear layers named by `targets` (a regex matched in full, or a list of names): every existing
    parameter is frozen, then A (kaiming-uniform as nn.Linear and PEFT init it, drawn from `seed`: the same on every
    rank, which FSDP2 needs since it shards each rank's own copy) and B (zeros) are added in fp32 and trainable, as
    are the parameters of `modules_to_save` (module names, e.g. "multi_modal_projector").
    frozen_dtype (e.g. torch.bfloat16) stores the frozen nn.Linear weights in that dtype: half the memory, and
    bit-identical under autocast to that dtype (autocast casts them to it anyway). Records the settings as vlm.lora."""
    assert rank > 0 and not hasattr(vlm, "lora"), "rank must be > 0, and a model takes one adapter"
    if vlm.config.family not in HF_CLASSES:
        raise ValueError(f"LoRA supports {', '.join(HF_CLASSES)} (PEFT names checked against transformers); "
                         f"not yet {vlm.config.family}")
    linears = {n: m for n, m in vlm.named_modules() if isinstance(m, nn.Linear)}
    if isinstance(targets, str):
        names = [n for n in linears if re.fullmatch(targets, n)]
    else:
        names, unknown = list(targets), [n for n in targets if n not in linears]
        if unknown:
            raise ValueError(f"adapter targets {unknown[:4]} are not nn.Linear layers of this {vlm.config.family} model")
    if not names:
        raise ValueError(f"lora_targets={targets!r} matches no nn.Linear layer (names look like "
                         f"{next(iter(linears))!r}); fix the pattern")
    vlm.requires_grad_(False)
    settings = dict(enabled=True, dropout=dropout, scale=alpha / (rank ** 0.5 if rslora else rank))
    g = torch.Generator().manual_seed(seed)
    for name in names:
        linear = linears[name]
        device = linear.weight.device
        linear.lora_A = nn.Linear(linear.in_features, rank, bias=False, device=device, dtype=torch.float32)
        linear.lora_B = nn.Linear(rank, linear.out_features, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():  # drawn on the CPU generator, then moved: the same A on any device
            linear.lora_A.weight.copy_(nn.init.kaiming_uniform_(torch.empty(rank, linear.in_features), a=math.sqrt(5),
                                                                generator=g))
        nn.init.zeros_(linear.lora_B.weight)
        linear.lora_settings = settings  # one dict shared by every layer: adapters_disabled flips it once
        linear.lora_hook = linear.register_forward_hook(_lora_forward)
    for name in modules_to_save:
        vlm.get_submodule(name).requires_grad_(True)
    for linear in vlm.modules() if frozen_dtype is not None else []:
        if isinstance(linear, nn.Linear) and not linear.weight.requires_grad:  # frozen: not A, B, modules_to_save
            for p in linear.parameters(recurse=False):
                p.data = p.data.to(frozen_dtype)
    vlm.lora = dict(rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, targets=names,
                    modules_to_save=list(modules_to_save), settings=settings)
    return names


@contextlib.contextmanager
def adapters_disabled(vlm):
    """The base model inside the block: every adapter's output is skipped. Trained modules_to_save are not swapped
    back, so the base model is exact only when there are none (dpo.py checks)."""
    settings = vlm.lora["settings"]
    before, settings["enabled"] = settings["enabled"], False
    try:
        yield vlm
    finally:
        settings["enabled"] = before


def lora_delta(A, B, scale):
    """scale·B·A (out, in) in fp32: what merging adds to the base weight."""
    return scale * (B.float() @ A.float())


def merge_lora(vlm):
    """Fold every adapter into its base weight (in the weight's dtype) and remove the adapters, in place."""
    with torch.no_grad():
        for name in vlm.lora["targets"]:
            linear = vlm.get_submodule(name)
            w = linear.weight
            w.copy_(w.float() + lora_delta(linear.lora_A.weight, linear.lora_B.weight, vlm.lora["settings"]["scale"]))
            linear.lora_hook.remove()
            del linear.lora_A, linear.lora_B, linear.lora_settings, linear.lora_hook
    del vlm.lora
    return vlm


def merged_state(state, lora):
    """A state dict with adapters (our names) -> the merged plain one, each weight in its own dtype."""
    out = {k: v for k, v in state.items() if ".lora_" not in k}
    for name in lora["targets"]:
        w = out[name + ".weight"]
        delta = lora_delta(state[name + ".lora_A.weight"], state[name + ".lora_B.weight"], lora["settings"]["scale"])
        out[name + ".weight"] = (w.float() + delta.to(w.device)).to(w.dtype)
    return out

# -----------------------------------------------------------------------------
# the PEFT file format: adapter_config.json + adapter_model.safetensors


def adapter_state(vlm):
    """{our name: full tensor} of what an adapter file holds: A, B, and the modules_to_save. Under FSDP2 every rank
    must call this (each DTensor is gathered, in the same order on every rank)."""
    saved = tuple(m + "." for m in vlm.lora["modules_to_save"])
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
            for n, p in vlm.named_parameters() if ".lora_" in n or n.startswith(saved)}


def save_adapter(vlm, path, state=None, base_model=None):
    """Write `path`/adapter_config.json + adapter_model.safetensors (fp32) as PEFT writes them for the transformers
    class of vlm's family. state: adapter_state(vlm) when gathered elsewhere (FSDP2). Atomic (tmp dir, rename)."""
    lora = vlm.lora
    state = adapter_state(vlm) if state is None else state
    cls, module = HF_CLASSES[vlm.config.family]
    config = dict(peft_type="LORA", task_type=None, r=lora["rank"], lora_alpha=lora["alpha"],
                  lora_dropout=lora["dropout"], use_rslora=lora["rslora"], use_dora=False, bias="none",
                  fan_in_fan_out=False, init_lora_weights=True, inference_mode=True,
                  target_modules=[hf_name(n, vlm.config.family) for n in lora["targets"]],
                  modules_to_save=[hf_name(m, vlm.config.family) for m in lora["modules_to_save"]] or None,
                  base_model_name_or_path=base_model or vlm.source_dir, revision=None,
                  auto_mapping=dict(base_model_class=cls,
                                    parent_library=f"transformers.models.{module}.modeling_{module}"))
    tensors = {PEFT_PREFIX + hf_name(n, vlm.config.family): t.float().cpu().contiguous() for n, t in state.items()}
    tmp = path.rstrip("/") + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if os.path.exists(path):
        old = path.rstrip("/") + f".old{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def load_adapter(vlm, path, **overrides):
    """Add the adapter in `path` (PEFT LoRA format) to vlm and load its tensors; -> vlm. `overrides` go to add_lora
    (frozen_dtype, dropout for further training)."""
    config_path, weights_path = (os.path.join(path, f) for f in ("adapter_config.json", "adapter_model.safetensors"))
    if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
        raise ValueError(f"{path!r} is not a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    with open(config_path) as f:
        config = json.load(f)
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported or config.get("bias", "none") != "none":
        raise ValueError(f"{config_path}: only plain LoRA adapters load (peft_type LORA, bias none, no DoRA or per-layer "
                         f"ranks); this one has peft_type {config.get('peft_type')!r}, bias {config.get('bias')!r}, "
                         f"{unsupported}")
    header, start = safetensors_header(weights_path)
    tensors = {}
    with open(weights_path, "rb") as f:
        for key, info in header.items():
            name = canonical_name(key.removeprefix(PEFT_PREFIX), vlm.config.family)
            tensors[name] = read_tensor(f, info, start)
    targets = sorted({re.sub(r"\.lora_[AB]\.weight$", "", n) for n in tensors if ".lora_" in n})
    odd = [n for n in tensors if ".lora_" in n and not re.search(r"\.lora_[AB]\.weight$", n)]
    if odd:
        raise ValueError(f"{weights_path} holds tensors this loader does not know: {odd[:4]}")
    modules_to_save = [canonical_name(m, vlm.config.family) for m in config.get("modules_to_save") or []]
    settings = dict(rank=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                    rslora=config.get("use_rslora", False))
    settings.update(overrides)
    add_lora(vlm, targets=targets, modules_to_save=modules_to_save, **settings)
    params = dict(vlm.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"{weights_path}: tensors {missing[:4]} have no place in this {vlm.config.family} model; "
                         f"is the adapter for another base model?")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(t.shape)}, the model wants "
                                 f"{tuple(params[name].shape)}; is the adapter for another base model?")
            params[name].copy_(t)
    return vlm
