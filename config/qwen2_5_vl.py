# Qwen2.5-VL-7B-Instruct (Qwen2-7B-style LM with multimodal RoPE, 670M window-attention ViT) DPO on one 8-GPU node:
#   torchrun --nproc_per_node=8 dpo.py config/qwen2_5_vl.py --pairs=... --video_root=...
# Same recipe as config/llava.py (published video-DPO settings: beta 0.1, lr 5e-7, cosine with warmup, bf16,
# activation checkpointing, reference log-probs precomputed: all dpo.py defaults); the checkpoint and the token
# budget differ. describe.py and bench.py take the same checkpoint with --model (the family comes from config.json).
init_from = "checkpoints/Qwen2.5-VL-7B-Instruct"  # huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir ...
pairs = "data/safevid/pairs.jsonl"
video_root = "data/safevid/videos"
out_dir = "out/qwen2_5_vl_dpo"
# The scripts feed fixed-size frames (448 x 448, video.preprocess): 32 frames = 16 frame pairs (temporal patch 2)
# * (448/28)^2 = 256 merged blocks = 4096 video tokens (a 16 s clip at the processor's 2 fps).
# Temporal RoPE positions assume 1 s per frame pair (the processor's value at 2 fps).
num_frames = 32
max_len = 8192  # [system + 4096 video + query | chosen | rejected]: ~100 prompt tokens leave ~2000 per response;
#                 with group_by_video (the default) up to 8 pairs of one video share its prefix within these 8192
decode_workers = 6  # per rank (48 on the node): decoding 32 frames by seeking is CPU work that must keep pace
# 8 pairs per micro step, so that a video's pairs meet and share one row (group_by_video); llava.py's batch_size=1
# would give every pair its own row. Worst case (8 pairs of 8 videos, 8 rows of 8192) is planned below.
batch_size = 8  # pairs per micro step per GPU
gradient_accumulation_steps = 2  # 8 pairs * 2 accum * 8 GPUs = 128 pairs per optimizer step
epochs = 2  # 350k pairs / 128 = ~2734 steps per epoch
warmup_iters = 150  # 2.7% of the 2 x 2734 = 5468 steps
# The ViT and the merger stay frozen (dpo.py's train_vision / train_projector defaults): the tower runs under no_grad.
# FSDP2 per decoder layer over 8 GPUs: 8.29B fp32 params (7.62B LM + 0.68B ViT and merger) = 3.9 GiB per GPU, the
# 7.62B trainable ones' fp32 grads + AdamW m, v (12 B each) = 10.6 GiB, bf16 copies in flight 4.2 GiB; activations
# with per-layer checkpointing 3.5 GiB per 8k row (28 layers * 8192 * 3584 * 2 B of bf16 layer inputs = 1.5 GiB, plus
# one layer recomputed): 47 GiB per GPU at batch_size=8 (23 GiB at 1; 17 rows fit in 80 GiB, 1 without checkpointing).
#   python dpo.py config/qwen2_5_vl.py --plan=True --plan_world=8 --device=cuda  (init_from: config.json suffices)
fsdp = True
activation_checkpointing = True
compile = True
eval_pairs = 512
eval_interval = 250
log_interval = 10
save_interval = 500
