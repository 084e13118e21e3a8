# LLaVA-OneVision-7B (Qwen2-7B LM, SigLIP-400M tower) DPO on one 8-GPU node:
#   torchrun --nproc_per_node=8 dpo.py config/llava.py --pairs=... --video_root=...
# Published video-DPO recipes: beta 0.1, lr 5e-7, cosine with warmup, 1-3 epochs, bf16, activation checkpointing
# (dpo.py's defaults, with reference log-probs precomputed: this file sets only what differs).
init_from = "checkpoints/llava-onevision-qwen2-7b-ov-hf"
pairs = "data/safevid/pairs.jsonl"
video_root = "data/safevid/videos"
out_dir = "out/llava_dpo"
# 32 frames * 196 tokens (27x27 SigLIP patches at 384 px, bilinear-resized to 14x14) + 1 newline = 6273 video
# tokens; prompt text ~100 and two responses up to ~900 each fit in 8192
num_frames = 32
max_len = 8192
decode_workers = 6  # per rank (48 on the node): decoding 32 frames by seeking is CPU work that must keep pace
batch_size = 1  # pairs per micro step per GPU: one 8k-token packed pair
gradient_accumulation_steps = 16  # 1 pair * 16 accum * 8 GPUs = 128 pairs per optimizer step
epochs = 2  # 350k pairs / 128 = ~2734 steps per epoch
warmup_iters = 150  # 2.7% of the 2 x 2734 = 5468 steps
# FSDP2 per decoder layer: 8.0B params * (4 B fp32 param + 4 grad + 8 Adam) = 128 GB / 8 GPUs = 16 GB per GPU, plus
# activations of one 8k pair with per-layer checkpointing (28 layers * 8192 * 3584 * 2 B = 1.6 GB of layer inputs)
# (python dpo.py config/llava.py --plan=True --plan_world=8 prints the per-GPU memory plan: README, section 5)
fsdp = True
activation_checkpointing = True
compile = True
eval_pairs = 512
eval_interval = 250
log_interval = 10
save_interval = 500
