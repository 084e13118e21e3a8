# LLaVA-NeXT-Video-7B (Vicuna-7B LM, CLIP ViT-L/14-336 tower) DPO on one 8-GPU node: SafeVid's headline model family
#   torchrun --nproc_per_node=8 dpo.py config/llava_next_video.py --pairs=... --video_root=...
# Same recipe as config/llava.py (published video-DPO settings: beta 0.1, lr 5e-7, cosine with warmup, bf16,
# activation checkpointing, all dpo.py defaults); only the checkpoint and the token budget differ.
init_from = "checkpoints/LLaVA-NeXT-Video-7B-hf"  # llava-hf/LLaVA-NeXT-Video-7B-hf (or its -DPO-hf sibling)
pairs = "data/safevid/pairs.jsonl"
video_root = "data/safevid/videos"
out_dir = "out/llava_next_video_dpo"
# 32 frames, as LLaVA-NeXT-Video's own video inference samples (the HF model card's example uses 8; the SafeVid paper's
# frame count is not in what we have): 32 * 144 tokens (24x24 CLIP patches at 336 px, 2x2 average pool, no newline)
# = 4608 video tokens. Vicuna's 4096 positions with linear RoPE scaling (x2 intended, x2.5 in later hub revisions)
# reach 8192; the rejected branch restarts at the prompt, so positions stay below prompt + longest response.
num_frames = 32
max_len = 8192  # packed [BOS + prompt + 4608 video | chosen | rejected]; ~100 prompt tokens leave ~1700 per response
decode_workers = 6  # per rank: 48 decode processes on the node's CPUs
batch_size = 1  # pairs per micro step per GPU
gradient_accumulation_steps = 16  # 1 pair * 16 accum * 8 GPUs = 128 pairs per optimizer step
epochs = 2  # 350k pairs / 128 = ~2734 steps per epoch
warmup_iters = 150  # 2.7% of the 2 x 2734 = 5468 steps
# FSDP2 per decoder layer: 7.06B params (6.74B Vicuna + 0.30B CLIP + 21M projector)
# * (4 B fp32 param + 4 grad + 8 Adam) = 113 GB / 8 GPUs = 14 GB per GPU, plus one 8k pair's checkpointed layer
# inputs (32 layers * 8192 * 4096 * 2 B = 2.1 GB)
fsdp = True
activation_checkpointing = True
compile = True
eval_pairs = 512
eval_interval = 250
log_interval = 10
save_interval = 500
