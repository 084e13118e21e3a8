"""
Video DPO (Rafailov et al. 2023, arXiv 2305.18290) on preference pairs, exact and resumable, from one CPU process to
`torchrun` on many GPUs:

    python dpo.py config/tiny.py                          # CPU, the demo's tiny model
    torchrun --nproc_per_node=8 dpo.py config/llava.py    # LLaVA-OneVision-7B on a node (FSDP2)
    python tests/bench_dpo.py config/tiny.py              # benchmarks: prefix sharing, fused log-probs, reference
    python dpo.py config/llava.py --lora_rank=16 --ref=live  # LoRA (lora.py) on one GPU: the reference is free
    python dpo.py config/llava.py --plan=True --plan_world=8  # per-GPU memory from config.json alone (memory_plan())

Reads as: loss -> scorer -> reference log-probs -> distributed setup -> checkpoints -> the loop. Pairs become tensors
in packing.py: a video's pairs share one row [system + video | q1 c1 r1 | q2 c2 r2 | ...] (group_by_video; each
branch sees the prefix and its own query, never another branch), so the video prefix and the vision tower run once
per video of a batch, not once per pair; group_by_video=False gives one row [prompt + video | chosen | rejected] per
pair. The training order shuffles whole video groups, so a video's pairs meet in one micro-batch. Log-probs
come from hidden states gathered at response positions only, through kernels.fused_logprobs. Reference log-probs are
precomputed to out_dir by default (ref="precompute"), so training holds one model.
out_dir gets: config.json, validation.json, ref_logps.*.jsonl, metrics.jsonl, ckpt-<step>/ (HF checkpoint + optim/
+ train_state.json), final/ (HF checkpoint with tokenizer files).
With lora_rank > 0 only the adapters (and the projector, with train_projector) train: the reference is the same module
with its adapters off (ref="live", no second model) or precomputed; ckpt-<step>/ holds the adapter in PEFT format
instead of the HF files; out_dir gets final_adapter/ (PEFT) and, with merge=True, final/ with the adapters merged in.
"""
import contextlib
import functools
import glob
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from configurator import Progress, defaults_of, main
from model import DTYPES, QWEN_FAMILIES, stored_dtype
from kernels import fused_logprobs
from packing import load_batches, validate_pairs, video_groups
from records import Writer, iter_records, read_records, write_json, write_records

# -----------------------------------------------------------------------------
# config: defaults (config/*.py and --key=value override them)
# I/O
init_from = "out/demo/model"  # Hugging Face checkpoint directory (llava_onevision or llava_next_video)
pairs = "out/demo/pairs.jsonl"  # preference pairs (ARCHITECTURE.md: id, video, prompt, chosen, rejected, ...)
video_root = ""  # relative `video` paths resolve against this ("" = the pairs file's directory)
out_dir = "out/dpo"
# data
num_frames = 8  # frames per video, uniform in time
max_len = 4096  # tokens of one packed pair [prompt + video | chosen | rejected]; responses are cut, never the video
strict = False  # True: any invalid pair is an error instead of being counted and dropped
group_by_video = True  # a video's pairs share one row [video prefix | q1 c1 r1 | q2 c2 r2 ...]: the prefix runs once
max_pairs_per_row = 8  # pairs in one grouped row at most (rows are also capped by max_len; the video is never cut)
decode_workers = 2  # background decode processes per rank (video.DecodePool; 0 = decode inline, no timeout)
decode_timeout = 120.0  # seconds one video may take to decode; past it the pair gets weight 0 and is recorded
# optimization
batch_size = 1  # pairs per micro step per process
gradient_accumulation_steps = 1
max_iters = 0  # optimizer steps; 0 = epochs over the training pairs
epochs = 1
learning_rate = 5e-7
min_lr_ratio = 0.0  # cosine decays to learning_rate * min_lr_ratio
warmup_iters = 0
weight_decay = 0.0
grad_clip = 1.0  # 0 = off
# DPO
beta = 0.1
loss_type = "sigmoid"  # "sigmoid" (DPO; cDPO with label_smoothing > 0) or "ipo" (on per-token mean log-probs)
label_smoothing = 0.0  # cDPO: assumed probability that a preference label is flipped
sft_weight = 0.0  # + sft_weight * per-token NLL of the chosen response
ref = "precompute"  # "precompute": reference log-probs written to out_dir first; "live": a frozen model copy
# what trains (the LM always does)
train_projector = False
train_vision = False
# LoRA (lora.py): lora_rank > 0 freezes every weight and trains low-rank adapters (plus the projector, with
# train_projector); trainable state at rank 16 on a 7B is ~0.5% of full fine-tuning's (BENCHMARKS.md)
lora_rank = 0  # 0 = full fine-tuning
lora_alpha = 32.0  # the adapter's output is scaled by lora_alpha / lora_rank
lora_dropout = 0.0
lora_targets = ""  # regex matched in full against module names ("" = lora.TARGETS: q/k/v/o + MLP of every LM layer)
lora_frozen_dtype = "float32"  # "bfloat16": frozen linear weights stored in bf16 (half the memory; dtype="bfloat16")
merge = True  # LoRA: also write final/, the adapters merged into the weights, in the source checkpoint's dtype
# system
device = "auto"  # "auto" = cuda:LOCAL_RANK when available, else cpu
dtype = "bfloat16"  # autocast dtype on GPU ("float32" = none); parameters and optimizer state stay fp32
attn_impl = "auto"  # "auto": Triton on CUDA, the reference on CPU; "sdpa": PyTorch SDPA for every layout (fallback)
export_dtype = ""  # final/'s dtype: "" = init_from's stored dtype (bf16 for hub 7B models); "float32", "bfloat16"
compile = False  # torch.compile each decoder layer
fsdp = False  # FSDP2: fully_shard per decoder layer and the root, bf16 compute, fp32 reduction
activation_checkpointing = False  # recompute each decoder layer in backward
plan = False  # True: print this config's per-GPU memory (from init_from/config.json alone) and exit; see memory_plan()
plan_world = 0  # GPUs the plan's FSDP2 shards over (0 = WORLD_SIZE, else 1)
gpu_memory_gb = 80.0  # GiB per GPU that the plan fits the largest batch_size into (leave room for the CUDA context)
# evaluation, logging, checkpoints
eval_interval = 0  # steps between evals (0 = only at the end)
eval_pairs = 0  # the last eval_pairs valid pairs are held out for eval
log_interval = 1
save_interval = 0  # steps between checkpoints (0 = only final/)
keep_checkpoints = 2  # ckpt-<step>/ dirs kept (the newest)
wandb_log = False
wandb_project = "safevid"
wandb_run_name = "dpo"
seed = 1337
DEFAULTS = defaults_of(globals())

# -----------------------------------------------------------------------------
# loss


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair DPO losses and implicit rewards, all (B,).
    sigmoid: -(1-ε)·logσ(β·h) - ε·logσ(-β·h), h = (π_c - π_r) - (ref_c - ref_r) (ε = cDPO label smoothing);
    ipo: (h - 1/(2β))² (Azar et al. 2023, arXiv 2310.12036). Rewards β·(π - ref) are detached (metrics only)."""
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type {loss_type!r} is not supported; use 'sigmoid' or 'ipo'")
    chosen = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return dict(losses=losses, rewards_chosen=chosen, rewards_rejected=rejected, rewards_margin=chosen - rejected,
                rewards_accuracy=(chosen > rejected).float())

# -----------------------------------------------------------------------------
# model side: pair log-probs in one module call (so DDP / FSDP2 see one forward per micro step)


class PairScorer(nn.Module):
    """The VLM plus the response log-prob head: input_ids (N, T) etc. from pack_pairs, pixels (U, F, 3, S, S) of the
    batch's videos, row_video (N,) -> per-token log-probs (M,) fp32 at the gathered response positions. The vision
    tower runs once per video of the batch, whatever the number of pairs on it."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, input_ids, pixels, position_ids, layout, gather, targets, row_video):
        vision = [*self.vlm.vision_tower.parameters(), *self.vlm.multi_modal_projector.parameters()]
        vision += [self.vlm.image_newline] if hasattr(self.vlm, "image_newline") else []  # llava_onevision only
        frozen = not any(p.requires_grad for p in vision)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            features = self.vlm.video_features(pixels)  # (U, n_video, H): each video of the batch once
        features = features[row_video]  # (N, n_video, H): a row's video (a grouped row holds several pairs)
        hidden = self.vlm(input_ids, video_features=features, position_ids=position_ids, layout=layout,
                          return_hidden=True)  # (N, T, H)
        weight = self.vlm.lm_head_weight  # (V, H)
        if torch.is_autocast_enabled(hidden.device.type):
            weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_logprobs(hidden.flatten(0, 1)[gather].to(weight.dtype), weight, targets)  # (M,)


def pair_logps(scorer, batch, device):
    """Summed response log-probs (chosen (B,), rejected (B,)) and response lengths (n_chosen, n_rejected)."""
    B = len(batch["ids"])
    t = {k: batch[k].to(device, non_blocking=True) for k in
         ("input_ids", "pixels", "position_ids", "layout", "gather", "targets", "segment", "row_video")}
    token_logps = scorer(t["input_ids"], t["pixels"], t["position_ids"], t["layout"], t["gather"], t["targets"],
                         t["row_video"])
    sums = torch.zeros(2 * B, device=device).index_add(0, t["segment"], token_logps)  # (2B,) [c0, r0, c1, r1, ...]
    counts = torch.zeros(2 * B, device=device).index_add(0, t["segment"], torch.ones_like(token_logps))
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


def batch_loss(policy, ref, counts, weights, cfg):
    """Weighted mean loss over the batch's readable pairs, and metric sums. policy/ref: (chosen, rejected) (B,)."""
    (pc, pr), (rc, rr), (nc, nr) = policy, ref, counts
    if cfg["loss_type"] == "ipo":  # IPO works on per-token mean log-probs (length-normalized)
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    out = dpo_loss(pc, pr, rc, rr, cfg["beta"], cfg["loss_type"], cfg["label_smoothing"])
    nll = -policy[0] / nc  # (B,) per-token NLL of chosen
    losses = out["losses"] + cfg["sft_weight"] * nll
    n = weights.sum()
    loss = (losses * weights).sum() / n.clamp(min=1)
    sums = {k: (out[k] * weights).sum().detach() for k in
            ("rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy")}
    sums.update(loss=(losses * weights).sum().detach(), nll=(nll * weights).sum().detach(), pairs=n)
    return loss, sums, out["rewards_accuracy"]

# -----------------------------------------------------------------------------
# evaluation passes and reference log-probs


def scan(scorer, load, items, indices, cfg, rank, world, ref_logps=None):
    """Yield (real, batch) over this rank's share of `indices` with the scorer in eval mode. Every rank gets the same
    number of batches (FSDP collectives need it): a rank that runs out repeats the first index, marked not real.
    `load` is packing.load_batches with this run's decode settings."""
    B, batches = cfg["batch_size"], []
    for k in range(math.ceil(len(indices) / (B * world))):
        chunk = indices[(k * world + rank) * B:(k * world + rank + 1) * B]
        batches.append((chunk, True) if chunk else (indices[:1], False))
    scorer.eval()
    for (_, real), batch in zip(batches, load(items, [b for b, _ in batches], ref_logps=ref_logps)):
        yield real, batch
    scorer.train()
    if hasattr(scorer, "reshard"):  # FSDP2 leaves the root's parameters gathered after a forward without backward
        scorer.reshard()


def load_ref(out_dir):
    """{pair content key: (chosen, rejected)} from every rank's ref_logps.r*.jsonl. Keyed by packing's `ref_key` (the
    pair's id, token ids, video and frames), so a regenerated pair with an old id never reuses a stale value."""
    ref = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "ref_logps.r*.jsonl"))):
        ref.update({r["key"]: (r["chosen"], r["rejected"]) for r in iter_records(path) if "key" in r})
    return ref


@torch.no_grad()
def precompute_ref(scorer, load, items, cfg, device, autocast, rank, world):
    """First pass with the initial weights: each pair's summed reference log-probs appended to
    out_dir/ref_logps.r<rank>.jsonl, flushed per pair; pairs whose content key is already on disk are skipped."""
    out_dir = cfg["out_dir"]
    meta = dict(init_from=os.path.abspath(cfg["init_from"]), num_frames=cfg["num_frames"], max_len=cfg["max_len"],
                dtype=cfg["dtype"], fsdp=cfg["fsdp"])  # what the stored log-probs depend on besides the pair
    meta_path = os.path.join(out_dir, "ref_logps.meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            raise ValueError(f"{out_dir} holds reference log-probs made with {old}, this run has {meta}; use another "
                             f"out_dir or delete {out_dir}/ref_logps.*")
    barrier(world)  # every rank has read the old meta before rank 0 writes the new one
    if rank == 0:
        write_json(meta_path, meta)
    done = load_ref(out_dir)
    todo = [i for i, it in enumerate(items) if it["ref_key"] not in done]
    progress = Progress("reference log-probs", len(todo), "pairs", enabled=rank == 0 and bool(todo))
    with Writer(os.path.join(out_dir, f"ref_logps.r{rank}.jsonl"), dedupe=False) as f:
        for real, batch in scan(scorer, load, items, todo, cfg, rank, world):
            with autocast:
                chosen, rejected, _, _ = pair_logps(scorer, batch, device)
            for pid, key, c, r in zip(batch["ids"], batch["ref_keys"], chosen.tolist(), rejected.tolist()):
                if real:
                    f.write(dict(id=pid, key=key, chosen=c, rejected=r))
            progress.update(len(batch["ids"]) * world)
    progress.close()
    barrier(world)
    ref = load_ref(out_dir)
    missing = [it["id"] for it in items if it["ref_key"] not in ref]
    assert not missing, f"reference log-probs missing for {missing[:5]}"
    return ref


# -----------------------------------------------------------------------------
# model setup: freezing, activation checkpointing, compile, DDP / FSDP2


def barrier(world):
    if world > 1:
        dist.barrier()


def build_scorer(path, cfg, device, trainable, adapter=None):
    """VLM from `path` (fp32) wrapped in a PairScorer; frozen parts per cfg; FSDP2 when cfg['fsdp'] (without LoRA:
    sharded while still on `meta`, then filled shard by shard, so no rank ever holds the whole model). With LoRA
    (trainable and lora_rank > 0) the adapters are added, fresh or read from the `adapter` dir (a checkpoint)."""
    from model import VLM, load_sharded
    sharded = cfg["fsdp"] and not (trainable and cfg["lora_rank"])  # adapters are made from loaded weights
    if sharded:
        vlm, sources, headers = VLM.on_meta(path)
        vlm.set_attn_impl(cfg["attn_impl"])
    else:
        vlm = VLM.from_pretrained(path, device="cpu" if cfg["fsdp"] else device, dtype=torch.float32,
                                  attn_impl=cfg["attn_impl"])
    set_trainable(vlm, cfg, trainable, adapter)
    layers = vlm.language_model.model.layers
    for layer in layers:
        if cfg["activation_checkpointing"] and trainable:  # keep each layer's input only; recompute in backward
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
        if cfg["compile"]:
            layer.compile()
    scorer = PairScorer(vlm)
    if cfg["fsdp"]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        low = torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(scorer, mp_policy=mp)  # the root: embeddings, vision tower, projector, final norm, head
        if sharded:
            load_sharded(vlm, sources, headers, device)  # peak host memory per rank: its shard + the largest tensor
    scorer.train(trainable)
    return scorer


def set_trainable(vlm, cfg, trainable, adapter=None):
    """requires_grad per cfg (the LM; the tower and projector only if asked), then LoRA's adapters if configured."""
    for p in vlm.parameters():
        p.requires_grad_(trainable)
    if trainable:
        vlm.vision_tower.requires_grad_(cfg["train_vision"])
        vlm.multi_modal_projector.requires_grad_(cfg["train_projector"])
        if hasattr(vlm, "image_newline"):  # llava_onevision's per-video newline embedding
            vlm.image_newline.requires_grad_(cfg["train_projector"])
    if trainable and cfg["lora_rank"]:
        add_adapters(vlm, cfg, adapter)


def export_hf(scorer, path, cfg, rank, dtype=None, adapter=False):
    """Write an HF checkpoint dir (model.save_pretrained, with the tokenizer files of its source) from rank 0, its
    floating-point tensors cast to `dtype` (None: as trained, fp32); under FSDP the full state dict is gathered to
    rank 0 first (every rank must call this). With LoRA: adapter=True writes the PEFT adapter instead; otherwise the
    adapters are merged into the weights first."""
    vlm = scorer.module.vlm if hasattr(scorer, "module") else scorer.vlm
    if adapter:
        import lora
        state = lora.adapter_state(vlm)  # under FSDP2: gathered on every rank, only the adapter's few tensors
        if rank == 0:
            lora.save_adapter(vlm, path, state)
        return
    if not cfg["fsdp"] and not cfg["lora_rank"]:
        if rank == 0:
            vlm.save_pretrained(path, dtype=dtype)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from model import VLM
    if cfg["fsdp"]:
        state = get_model_state_dict(scorer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {k.removeprefix("vlm."): v for k, v in state.items()}
    else:
        state = vlm.state_dict()
    if rank == 0:  # a meta-device shell with the gathered tensors assigned: no second copy
        if cfg["lora_rank"]:
            import lora
            state = lora.merged_state(state, vlm.lora)
        with torch.device("meta"):
            shell = VLM(vlm.config)
        shell.load_state_dict(state, assign=True)
        shell.source_dir = vlm.source_dir
        shell.save_pretrained(path, dtype=dtype)


def add_adapters(vlm, cfg, adapter_dir=None):
    """LoRA per cfg on a loaded VLM: fresh adapters (B = 0), or those of a checkpoint's adapter dir."""
    import lora
    kw = dict(dropout=cfg["lora_dropout"], frozen_dtype=torch.bfloat16 if cfg["lora_frozen_dtype"] == "bfloat16"
              else None)
    if adapter_dir:
        return lora.load_adapter(vlm, adapter_dir, **kw)
    lora.add_lora(vlm, cfg["lora_rank"], cfg["lora_alpha"], targets=cfg["lora_targets"] or lora.TARGETS,
                  modules_to_save=["multi_modal_projector"] if cfg["train_projector"] else [], seed=cfg["seed"], **kw)
    return vlm


def without_adapters(scorer):
    """LoRA's live reference: the same (unwrapped) scorer with its adapters switched off. No second model."""
    import lora

    def ref_scorer(*args):
        with lora.adapters_disabled(scorer.vlm):
            return scorer(*args)
    return ref_scorer

# -----------------------------------------------------------------------------
# checkpoints: ckpt-<step>/ = HF files + optim/ (torch.distributed.checkpoint) + rng-rank<r>.pt + train_state.json
# (written last, inside a .tmp dir renamed into place: a dir without it is incomplete and ignored)


def final_dtype(cfg):
    """final/'s dtype: export_dtype if set, else the dtype init_from was stored in (bf16 for the hub's 7B models)."""
    if cfg["export_dtype"]:
        return DTYPES[cfg["export_dtype"]]
    with open(os.path.join(cfg["init_from"], "config.json")) as f:
        return stored_dtype(json.load(f))


def latest_checkpoint(out_dir):
    done = glob.glob(os.path.join(out_dir, "ckpt-*", "train_state.json"))
    steps = [int(s) for s in (os.path.basename(os.path.dirname(p)).removeprefix("ckpt-") for p in done) if s.isdigit()]
    return os.path.join(out_dir, f"ckpt-{max(steps)}") if steps else None


def save_checkpoint(scorer, optimizer, state, cfg, rank, world):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    final = os.path.join(cfg["out_dir"], f"ckpt-{state['step']}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(world)
    export_hf(scorer, tmp, cfg, rank, adapter=cfg["lora_rank"] > 0)  # LoRA: only the adapter, in PEFT format
    barrier(world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs in one process when there is no process group
        dcp.save({"optim": get_optimizer_state_dict(scorer, optimizer)}, checkpoint_id=os.path.join(tmp, "optim"))
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
    torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))
    barrier(world)
    if rank == 0:
        write_json(os.path.join(tmp, "train_state.json"), state)  # last: a dir without it is incomplete
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(glob.glob(os.path.join(cfg["out_dir"], "ckpt-*")), key=lambda p: p.rsplit("-", 1)[-1].zfill(12))
        done = [p for p in done if p.rsplit("-", 1)[-1].isdigit()]
        for old in done[:-cfg["keep_checkpoints"]] if cfg["keep_checkpoints"] > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(world)

# -----------------------------------------------------------------------------
# training


def get_lr(step, cfg, total):
    """Linear warmup over warmup_iters, then cosine from learning_rate to learning_rate * min_lr_ratio at `total`."""
    lr, warm = cfg["learning_rate"], cfg["warmup_iters"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return lr * (cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


METRICS = ("loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy", "nll")


def reduce_sums(sums, world, device):
    """Sum metric dicts over ranks in one all-reduce; -> {name: float}."""
    keys = sorted(sums)
    t = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    if world > 1:
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def score(scorer, ref_scorer, batch, device, autocast):
    """Policy and reference summed log-probs, each (chosen (B,), rejected (B,)), and the response lengths. The
    reference is the live frozen model when there is one, else the batch's precomputed values."""
    with autocast:
        *policy, nc, nr = pair_logps(scorer, batch, device)
        if ref_scorer is None:
            return policy, batch["ref"].to(device).unbind(1), (nc, nr)
        with torch.no_grad():
            return policy, pair_logps(ref_scorer, batch, device)[:2], (nc, nr)


@torch.no_grad()
def evaluate(scorer, ref_scorer, load, items, ref_logps, cfg, device, autocast, rank, world):
    """Loss and reward metrics over the held-out pairs, plus accuracy per category."""
    sums, hits = {}, {}
    for real, batch in scan(scorer, load, items, list(range(len(items))), cfg, rank, world, ref_logps):
        policy, ref, counts = score(scorer, ref_scorer, batch, device, autocast)
        weights = batch["weights"].to(device) * real
        _, s, correct = batch_loss(policy, ref, counts, weights, cfg)
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
        for cat, ok, w in zip(batch["categories"], correct.tolist(), weights.tolist()):
            if w:
                hits.setdefault(cat, []).append(ok)
    total = reduce_sums(sums, world, device) if sums else {}
    mine = {cat: (sum(oks), len(oks)) for cat, oks in hits.items()}
    parts = [mine] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(parts, mine)
    by_category = {}
    for part in parts:
        for cat, (ok, n) in part.items():
            prev = by_category.get(cat, (0.0, 0))
            by_category[cat] = (prev[0] + ok, prev[1] + n)
    n = max(total.get("pairs", 0.0), 1.0)
    out = {f"eval_{k}": total.get(k, 0.0) / n for k in METRICS}
    out["eval_pairs"] = int(total.get("pairs", 0))
    out["eval_accuracy_by_category"] = {c: ok / n for c, (ok, n) in sorted(by_category.items())}
    return out


def train_batches(groups, total, start, cfg, world, rank):
    """Index lists of this rank's micro-batches for steps start..total-1. `groups`: index lists of pairs that stay
    together (a video's pairs, packing.video_groups; or one pair each). Each epoch e orders the groups by a
    permutation seeded by (seed, e) and concatenates them; step s of epoch e = s // steps_per_epoch takes the next
    global batch (world * batch_size * accumulation pairs) of that order. Micro-batches count pairs, so a step means
    the same number of pairs with or without grouping; the data position is the step itself, so a resume neither
    skips nor repeats a pair."""
    B, accum = cfg["batch_size"], cfg["gradient_accumulation_steps"]
    global_batch = world * B * accum
    per_epoch = sum(map(len, groups)) // global_batch
    out, orders = [], {}
    for s in range(start, total):
        epoch, within = divmod(s, per_epoch)
        if epoch not in orders:
            perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(cfg["seed"] + epoch)).tolist()
            orders = {epoch: [i for g in perm for i in groups[g]]}
        for m in range(accum):
            begin = within * global_batch + (m * world + rank) * B
            out.append(orders[epoch][begin:begin + B])
    return out


def check_config(cfg):
    """Config errors fail here, before any work."""
    problems = [f"{key}={cfg[key]!r} must be {want}" for key, ok, want in [
        ("loss_type", cfg["loss_type"] in ("sigmoid", "ipo"), "'sigmoid' or 'ipo'"),
        ("ref", cfg["ref"] in ("precompute", "live"), "'precompute' or 'live'"),
        ("beta", cfg["beta"] > 0, "> 0"),
        ("label_smoothing", 0 <= cfg["label_smoothing"] < 0.5, "in [0, 0.5)"),
        ("dtype", cfg["dtype"] in ("float32", "bfloat16"), "'float32' or 'bfloat16'"),
        ("batch_size", cfg["batch_size"] >= 1, ">= 1"),
        ("gradient_accumulation_steps", cfg["gradient_accumulation_steps"] >= 1, ">= 1"),
        ("num_frames", cfg["num_frames"] >= 1, ">= 1"),
        ("max_pairs_per_row", cfg["max_pairs_per_row"] >= 1, ">= 1"),
        ("log_interval", cfg["log_interval"] >= 1, ">= 1"),
        ("attn_impl", cfg["attn_impl"] in ("auto", "triton", "sdpa"), "'auto', 'triton' or 'sdpa'"),
        ("export_dtype", cfg["export_dtype"] in ("", *DTYPES), "'' or one of " + ", ".join(DTYPES)),
        *lora_problems(cfg)] if not ok]
    if problems:
        raise ValueError("bad config: " + "; ".join(problems))


def lora_problems(cfg):
    """check_config's rows for the LoRA keys."""
    lora = cfg["lora_rank"] > 0
    return [("lora_rank", cfg["lora_rank"] >= 0, ">= 0"),
            ("train_vision", not (lora and cfg["train_vision"]), "False with LoRA (adapt vision layers through "
                                                                  "lora_targets)"),
            ("ref", not (lora and cfg["train_projector"] and cfg["ref"] == "live"), "'precompute' with LoRA and "
             "train_projector (switching adapters off does not restore a trained projector)"),
            ("lora_frozen_dtype", cfg["lora_frozen_dtype"] == "float32" or (
                cfg["lora_frozen_dtype"] == "bfloat16" and cfg["dtype"] == "bfloat16"),
             "'float32', or 'bfloat16' with dtype='bfloat16'")]


# -----------------------------------------------------------------------------
# memory planner: per-GPU bytes of a config from init_from/config.json alone (the model is built on `meta`)

GiB = 2 ** 30


def layer_bytes(t, cast, R, A, kv_tokens, norm_grad, lora_rank):
    """Bytes one decoder layer saves for backward per token: what model.py's ops keep (measured on the tiny model by
    tests/test_dpo_plan.py). cast: autocast, where each linear saves its own A-byte copy of a norm's output; R / A:
    bytes of the residual stream / of the matmul outputs; kv_tokens: keys saved per token (> 1 on the reference
    attention, whose rejected piece copies the prefix keys); norm_grad: the norm weights train (z = x·rsqrt kept)."""
    Dq, Dkv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    norm = lambda k: t.hidden_size * (4 + R * norm_grad + (k * A if cast else R)) + 4  # x fp32, z, inputs; rsqrt
    attn = A * (3 * Dq + 2 * Dkv * kv_tokens) + 4 * t.num_heads  # q, o, o for o_proj, k, v; log-sum-exp fp32
    rope = 4 * t.head_dim * A if cast else 0  # cos, sin cast to A, for q and for k
    return norm(3) + norm(2) + attn + rope + 4 * t.intermediate_size * A + 7 * lora_rank * A  # gate, silu, up, prod


def vision_bytes(c, cfg, cast, A):
    """Bytes the vision tower and projector save per frame when they train (0 when frozen: run under no_grad)."""
    v, t = c.vision, c.text
    if not (cfg["train_vision"] or cfg["train_projector"]):
        return 0
    if c.family in QWEN_FAMILIES:
        raise ValueError("the memory plan estimates a training vision tower for the LLaVA families only; plan "
                         f"{c.family} with train_vision=False and train_projector=False")
    patches = v.grid ** 2 + (v.kind == "clip")
    total = patches * A * (v.hidden_size * len(c.feature_layers) + 2 * t.hidden_size)  # linear_1 in, gelu in, out
    if cfg["train_vision"]:  # per block: x, LN out (a cast per linear), q k v o, o for out_proj, x', LN out, fc1, gelu
        n = max(i % (v.num_layers + 1) for i in c.feature_layers)
        block = v.hidden_size * (8 + (4 * A if cast else 8) + 5 * A) + 2 * v.intermediate_size * A + 16
        total += n * patches * block + 3 * v.image_size ** 2 * A  # + the pixels the patch conv keeps
    return total


def memory_plan(cfg, quiet=False):
    """Per-GPU memory of one training step of `cfg` -> dict of bytes (components, totals with activation
    checkpointing off and on, max_batch_size[_checkpointed] under gpu_memory_gb), printed as a table in GiB.
    A micro-batch is batch_size pairs, each its own row of max_len tokens whose responses fill what the video leaves
    (pairs of distinct videos: the worst case with or without group_by_video, whose rows max_len caps too). Device
    "cpu" plans fp32 and the reference attention; a GPU plans cfg's dtype (autocast, or FSDP2's bf16 parameters)."""
    from kernels import _default_chunk
    from model import VLM, parse_config
    path = os.path.join(cfg["init_from"], "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"the memory plan needs the checkpoint's config.json, and {path} does not exist (init_from "
                         f"must be a local directory, not a hub id): download the checkpoint, or only its "
                         f"config.json, to a directory and point init_from at it")
    with open(path) as f:
        config = parse_config(json.load(f))
    with torch.device("meta"):
        vlm = VLM(config)
        set_trainable(vlm, cfg, True)
    t, gpu = config.text, cfg["device"] != "cpu"
    world = cfg["plan_world"] or int(os.environ.get("WORLD_SIZE", 1))
    shard = world if cfg["fsdp"] else 1
    low = gpu and cfg["dtype"] == "bfloat16"
    cast, A, R = low and not cfg["fsdp"], 2 if low else 4, 2 if low and cfg["fsdp"] else 4
    params, layers = list(vlm.parameters()), vlm.language_model.model.layers
    n_train = sum(p.numel() for p in params if p.requires_grad)
    out = dict(parameters=sum(p.numel() * p.element_size() for p in params) / shard,
               gradients=4 * n_train / shard, optimizer=8 * n_train / shard)  # grads fp32; AdamW m and v fp32
    if cfg["fsdp"]:  # FSDP2 keeps the root gathered from forward to backward, plus a layer and the next in flight
        root = sum(p.numel() for p in params) - sum(p.numel() for p in layers.parameters())
        out["weight_copies"] = A * (root + 2 * sum(p.numel() for p in layers[0].parameters()))
    else:  # autocast keeps a bf16 copy of each fp32 weight a matmul with gradients uses, until backward
        used = [*layers.parameters(), vlm.lm_head_weight]
        vision = [*vlm.vision_tower.parameters(), *vlm.multi_modal_projector.parameters()]
        used += [p for p in vision if p.requires_grad]
        out["weight_copies"] = cast * 2 * sum(p.numel() for p in used if p.ndim >= 2 and p.dtype == torch.float32)
    out["reference"] = 4 * sum(p.numel() for p in params) / shard if cfg["ref"] == "live" and not cfg["lora_rank"] \
        else 0  # a second fp32 model; LoRA's reference is the same model with its adapters off
    P, T = vlm.num_video_tokens(cfg["num_frames"]), cfg["max_len"]  # the prompt is at least the video
    if P >= T:
        raise ValueError(f"max_len={T} leaves no room for responses after {P} video tokens; raise max_len")
    kv = (T + P) / T if not gpu or cfg["attn_impl"] == "sdpa" else 1.0
    base = not cfg["lora_rank"]  # the base weights train: the embedding keeps its ids, the norms x·rsqrt
    layer = layer_bytes(t, cast, R, A, kv, base, cfg["lora_rank"]) * T  # one row
    row = T * (8 * base + 1 + t.hidden_size * (4 + R * base) + 4) \
        + (T - P) * (t.hidden_size * A + 32) + cfg["num_frames"] * vision_bytes(config, cfg, cast, A)
    # ^ per token: ids, the video mask, the final norm; per response token: its hidden row in A, indices, log-probs
    dc = _default_chunk(t.vocab_size, torch.device("cuda" if gpu else "cpu"))
    fixed = sum(out.values())

    def step(B):  # what grows with the micro-batch: activations and the logits chunk
        M = B * (T - P)  # response tokens
        chunk = -(-M // -(-M // dc))  # fused_logprobs' rows per chunk
        s = dict(rows=B, response_tokens=M, logits_naive=4 * M * t.vocab_size,
                 logits=chunk * t.vocab_size * (4 + (A if A < 4 else 0)),  # fp32 chunk (+ its gradient in A)
                 activations=B * (t.num_layers * layer + row) + 8 * T * t.head_dim,  # + cos, sin fp32
                 activations_checkpointed=B * (t.num_layers * T * t.hidden_size * R + layer + row) + 8 * T * t.head_dim)
        s["total"] = fixed + s["logits"] + s["activations"]  # checkpointing: layer inputs + one layer recomputed
        s["total_checkpointed"] = fixed + s["logits"] + s["activations_checkpointed"]
        return s

    out.update(step(cfg["batch_size"]), world=shard)
    for key in ("total", "total_checkpointed"):  # the largest batch_size under gpu_memory_gb (totals grow with it)
        b = 0
        while b < 4096 and step(b + 1)[key] <= cfg["gpu_memory_gb"] * GiB:
            b += 1
        out["max_batch_size" + key.removeprefix("total")] = b
    if not quiet:
        print_plan(out, cfg, config)
    return out


def print_plan(out, cfg, config):
    """memory_plan()'s table: one row per component, columns activation checkpointing off / on."""
    g = lambda x: f"{x / GiB:10.2f}"  # noqa: E731
    print(f"memory plan per GPU (GiB) for {config.family} at batch_size={out['rows']} x max_len={cfg['max_len']} "
          f"({out['response_tokens']} response tokens), num_frames={cfg['num_frames']}, "
          f"{'fsdp over ' + str(out['world']) + ' GPUs' if cfg['fsdp'] else 'no fsdp'}, lora_rank={cfg['lora_rank']}, "
          f"ref={cfg['ref']}, {'CPU fp32' if cfg['device'] == 'cpu' else 'GPU ' + cfg['dtype']}")
    print(f"{'':32}{'AC off':>10}{'AC on':>10}")
    for key, name in (("parameters", "parameters"), ("gradients", "gradients (fp32)"),
                      ("optimizer", "AdamW m + v (fp32)"), ("weight_copies", "autocast / FSDP2 weight copies"),
                      ("reference", "live reference model"), ("logits", "logits (fused chunk)")):
        print(f"{name:32}{g(out[key])}{g(out[key])}")
    print(f"{'activations':32}{g(out['activations'])}{g(out['activations_checkpointed'])}")
    print(f"{'total':32}{g(out['total'])}{g(out['total_checkpointed'])}")
    print(f"{'largest batch_size in ' + str(cfg['gpu_memory_gb']) + ' GiB':32}{out['max_batch_size']:10d}"
          f"{out['max_batch_size_checkpointed']:10d}")
    print(f"(naive response logits, {out['response_tokens']} tokens x {config.text.vocab_size} vocab in fp32, would be "
          f"{out['logits_naive'] / GiB:.2f} GiB; activation_checkpointing={cfg['activation_checkpointing']} is set)")


def load_pairs(cfg, tok, vlm, world, master):
    """Validate every pair before any step (report to out_dir/validation.json) and hold out the last eval_pairs.
    Returns (all items, train items, eval items, global batch in pairs, total optimizer steps)."""
    root = cfg["video_root"] or os.path.dirname(os.path.abspath(cfg["pairs"]))
    items, report = validate_pairs(cfg["pairs"], tok, vlm.num_video_tokens(cfg["num_frames"]), cfg["max_len"], root,
                                   cfg["strict"], cfg["num_frames"])
    if master:
        print(f"pairs: {report['kept']} kept ({report['truncated']} with truncated responses), dropped "
              f"{ {k: v for k, v in report['dropped'].items() if v} }")
        write_json(os.path.join(cfg["out_dir"], "validation.json"), report)
    n_train = len(items) - cfg["eval_pairs"]
    train_items, eval_items = items[:n_train], items[n_train:]
    global_batch = world * cfg["batch_size"] * cfg["gradient_accumulation_steps"]
    if len(train_items) < global_batch:
        raise ValueError(f"{len(train_items)} training pairs are fewer than one global batch of {global_batch} "
                         f"(world x batch_size x gradient_accumulation_steps); lower those or add pairs")
    total = cfg["max_iters"] or cfg["epochs"] * (len(train_items) // global_batch)
    return items, train_items, eval_items, global_batch, total


def resume(scorer, optimizer, ckpt, global_batch, n_train, rank, device):
    """Optimizer state and this rank's RNG from ckpt (same global batch and training pairs); -> its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    with open(os.path.join(ckpt, "train_state.json")) as f:
        state = json.load(f)
    if state["global_batch"] != global_batch or state["train_pairs"] != n_train:
        raise ValueError(f"{ckpt} was trained with a global batch of {state['global_batch']} pairs over "
                         f"{state['train_pairs']} training pairs, this run has {global_batch} over {n_train}; resume "
                         f"with the same world x batch_size x gradient_accumulation_steps and the same valid pairs "
                         f"(see validation.json), or start in a fresh out_dir")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optim = {"optim": get_optimizer_state_dict(scorer, optimizer)}
        dcp.load(optim, checkpoint_id=os.path.join(ckpt, "optim"))
    set_optimizer_state_dict(scorer, optimizer, optim["optim"])
    rng_path = os.path.join(ckpt, f"rng-rank{rank}.pt")
    if os.path.isfile(rng_path):  # absent for a rank the saving run did not have
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


def accumulate(scorer, ref_scorer, loader, cfg, world, device, autocast, step, errors_path):
    """Forward + backward of one optimizer step's gradient_accumulation_steps micro-batches; unreadable videos are
    appended to errors_path. Returns (metric sums, the ids of the pairs seen)."""
    accum, sums, ids = cfg["gradient_accumulation_steps"], {}, []
    for m in range(accum):
        batch = next(loader)
        ids += batch["ids"]
        if batch["errors"]:
            with Writer(errors_path, dedupe=False) as f:
                for e in batch["errors"]:
                    f.write(dict(step=step + 1, **e))
        sync = m == accum - 1  # all-reduce / reduce-scatter gradients only on the last micro step
        if cfg["fsdp"]:
            scorer.set_requires_gradient_sync(sync)
        no_sync = scorer.no_sync() if world > 1 and not cfg["fsdp"] and not sync else contextlib.nullcontext()
        with no_sync:
            policy, ref, counts = score(scorer, ref_scorer, batch, device, autocast)
            loss, s, _ = batch_loss(policy, ref, counts, batch["weights"].to(device), cfg)
            (loss / accum).backward()
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums, ids


def train(cfg):
    """The whole run for one process (under torchrun: one rank). Returns a summary dict: status "done", or
    "incomplete" when SIGTERM stopped it after a checkpoint (a rerun resumes). SIGTERM (preemption) sets `stop`: the
    step in flight finishes, is saved, and the run returns. The handler is set before any work, so a signal during
    loading or the reference pass is not lost: the run stops after its first step."""
    check_config(cfg)
    if cfg["plan"]:
        memory_plan(cfg)
        return dict(status="done", note="memory plan only")
    stop = []
    main_thread = threading.current_thread() is threading.main_thread()  # only it may install a signal handler
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.append(1)) if main_thread else None
    try:
        return run(cfg, stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run(cfg, stop):
    from model import setup_runtime
    from tokenizer import Tokenizer
    rank, world, device, _ = setup_runtime(cfg["device"], cfg["dtype"])
    master, out_dir = rank == 0, cfg["out_dir"]
    final_dir, adapter_dir = os.path.join(out_dir, "final"), os.path.join(out_dir, "final_adapter")
    lora_only = cfg["lora_rank"] and not cfg["merge"]  # the run's last output: final/config.json, else the adapter
    if os.path.isfile(os.path.join(adapter_dir, "adapter_config.json") if lora_only else
                      os.path.join(final_dir, "config.json")):
        print(f"{final_dir} exists: this run is finished (delete it, or use another out_dir, to train again)")
        return dict(status="done", note="already finished")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg["seed"] + rank)
    ckpt = latest_checkpoint(out_dir)
    tok = Tokenizer.from_pretrained(cfg["init_from"])
    if cfg["lora_rank"]:  # the base from init_from, the adapter from the checkpoint
        scorer = build_scorer(cfg["init_from"], cfg, device, trainable=True, adapter=ckpt)
    else:
        scorer = build_scorer(ckpt or cfg["init_from"], cfg, device, trainable=True)
    vlm = scorer.vlm
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg["dtype"] == "bfloat16" and not cfg["fsdp"] \
        else contextlib.nullcontext()  # FSDP2 casts parameters itself (MixedPrecisionPolicy)
    items, train_items, eval_items, global_batch, total = load_pairs(cfg, tok, vlm, world, master)
    pad_id = tok.pad_id if tok.pad_id not in (None, vlm.config.video_token_id) else 0
    decode_args = (cfg["num_frames"], vlm.config.family, vlm.config.vision.image_size)
    max_pairs = cfg["max_pairs_per_row"] if cfg["group_by_video"] else 1
    load = functools.partial(load_batches, decode_args=decode_args, workers=cfg["decode_workers"],
                             timeout=cfg["decode_timeout"], pad_id=pad_id, max_pairs=max_pairs, max_len=cfg["max_len"])

    # ---- reference log-probs: a live frozen copy, or computed once before the first step
    ref_scorer, ref_logps = None, None
    if cfg["ref"] == "live" and cfg["lora_rank"]:
        ref_scorer = without_adapters(scorer)
    elif cfg["ref"] == "live":
        ref_scorer = build_scorer(cfg["init_from"], cfg, device, trainable=False)
    elif ckpt is None:
        ref_logps = precompute_ref(scorer, load, items, cfg, device, autocast, rank, world)
    else:
        ref_logps = load_ref(out_dir)
        missing = [it["id"] for it in items if it["ref_key"] not in ref_logps]
        if missing:
            raise ValueError(f"{len(missing)} pairs (e.g. {missing[:3]}) have no reference log-probs in {out_dir} "
                             f"but training already started there; restore them or start in a fresh out_dir")

    # ---- wrap, optimizer, resume, logs
    if world > 1 and not cfg["fsdp"]:
        scorer = nn.parallel.DistributedDataParallel(scorer, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p in scorer.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=cfg["weight_decay"]),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    optimizer = torch.optim.AdamW(groups, lr=cfg["learning_rate"], fused=device.type == "cuda")
    start = resume(scorer, optimizer, ckpt, global_batch, len(train_items), rank, device) if ckpt else 0
    if ckpt and master:
        print(f"resuming from {ckpt} at step {start}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:  # drop what was logged after the checkpoint we resume from: it is about to be redone
        resumed = ckpt and os.path.isfile(metrics_path)
        kept = [r for r in read_records(metrics_path) if r["step"] <= start] if resumed else []
        write_records(metrics_path, kept)
    wandb = None
    if master and cfg["wandb_log"]:
        import wandb
        from configurator import masked
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=masked(cfg))

    metrics = Writer(metrics_path, dedupe=False) if master else None

    def log(record):
        if master:
            metrics.write(record)
            if wandb is not None:
                wandb.log({k: v for k, v in record.items() if not isinstance(v, dict)}, step=record["step"])

    def run_eval(step):
        out = evaluate(scorer, ref_scorer, load, eval_items, ref_logps, cfg, device, autocast, rank, world)
        if master:
            print(f"eval step {step}: loss {out['eval_loss']:.4f}, accuracy {out['eval_rewards_accuracy']:.3f}, "
                  f"margin {out['eval_rewards_margin']:.4f}, by category {out['eval_accuracy_by_category']}")
        log(dict(step=step, **out))
        return out

    # ---- the step loop
    # the order shuffles whole video groups either way; group_by_video only decides whether they share rows, so
    # the two layouts see the same pairs at every step (and their losses agree: tests/test_dpo.py)
    groups = video_groups(train_items, cfg["max_pairs_per_row"], cfg["max_len"])
    batches = train_batches(groups, total, start, cfg, world, rank)
    loader = load(train_items, batches, ref_logps=ref_logps)
    last, errors_path, t_start = {}, os.path.join(out_dir, f"errors.r{rank}.jsonl"), time.time()
    try:
        for step in range(start, total):
            lr = get_lr(step, cfg, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            sums, ids = accumulate(scorer, ref_scorer, loader, cfg, world, device, autocast, step, errors_path)
            sums["stop"] = float(bool(stop))  # summed over ranks: all stop at the same step
            mine_finite = math.isfinite(float(sums["loss"]))
            total_sums = reduce_sums(sums, world, device)
            if not math.isfinite(total_sums["loss"]):
                where = f"pairs {ids} on rank {rank}" if not mine_finite else "pairs on another rank"
                raise FloatingPointError(f"non-finite loss at step {step + 1} ({where}); no update was applied. Lower "
                                         f"learning_rate or drop those pairs, and resume from the last checkpoint")
            clip = cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf")  # inf: measure the norm, clip nothing
            grad_norm = float(nn.utils.clip_grad_norm_(params, clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt, done = time.time() - t0, step + 1
            n = max(total_sums["pairs"], 1.0)
            last = dict(step=done, **{k: total_sums[k] / n for k in METRICS}, lr=lr, grad_norm=grad_norm,
                        pairs_per_s=global_batch / dt)
            if done % cfg["log_interval"] == 0 or done == total:
                log(last)
                if master:
                    eta = (time.time() - t_start) / (done - start) * (total - done)  # seconds, at the mean step time
                    print(f"step {done}/{total} | loss {last['loss']:.4f} | acc {last['rewards_accuracy']:.2f} | "
                          f"margin {last['rewards_margin']:.4f} | chosen {last['rewards_chosen']:.4f} | rejected "
                          f"{last['rewards_rejected']:.4f} | lr {lr:.2e} | {last['pairs_per_s']:.2f} pairs/s | "
                          f"ETA {eta / 60:.1f} min", flush=True)
            if cfg["eval_interval"] and done % cfg["eval_interval"] == 0 and eval_items and done < total:
                run_eval(done)
            if total_sums["stop"] or (cfg["save_interval"] and done % cfg["save_interval"] == 0 and done < total):
                save_checkpoint(scorer, optimizer, dict(step=done, pairs_seen=done * global_batch,
                                                        global_batch=global_batch, world_size=world,
                                                        train_pairs=len(train_items)), cfg, rank, world)
                if total_sums["stop"]:
                    if master:
                        print(f"SIGTERM: saved ckpt-{done} and stopped; rerun the same command to resume")
                    return dict(status="incomplete", stopped="SIGTERM", step=done, metrics=last)
        if world > 1 and not cfg["fsdp"]:
            check_replicas(params, world, master)
        final_eval = run_eval(total) if eval_items else {}
        if cfg["lora_rank"]:
            export_hf(scorer, adapter_dir, cfg, rank, adapter=True)
        if not lora_only:
            export_hf(scorer, final_dir, cfg, rank, dtype=final_dtype(cfg))
        barrier(world)
        if master:
            print(f"done: {adapter_dir if lora_only else final_dir}")
        return dict(status="done", step=total, metrics=last, eval=final_eval)
    finally:
        loader.close()
        if metrics is not None:
            metrics.close()


def check_replicas(params, world, master):
    """DDP keeps one model per rank; prove the copies agree (max and min of per-tensor fp64 sums over ranks)."""
    sums = torch.stack([p.detach().double().sum() for p in params] + [p.detach().double().abs().sum() for p in params])
    high, low = sums.clone(), sums.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError("DDP replicas diverged: parameters differ across ranks")
    if master:
        print(f"weights identical on {world} ranks")


if __name__ == "__main__":
    sys.exit(main("dpo.py", DEFAULTS, train, sys.argv[1:],
                  lambda c: (None, None) if c["plan"] else (os.path.join(c["out_dir"], "config.json"),
                                                             os.path.join(c["out_dir"], "summary.json"))))
