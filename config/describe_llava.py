# describe.py with LLaVA-OneVision-7B on one 8-GPU node:
#   torchrun --nproc_per_node=8 describe.py config/describe_llava.py --videos=videos/ --out=out/descriptions.jsonl
model = "checkpoints/llava-onevision-qwen2-7b-ov-hf"
device = "cuda"  # cuda:LOCAL_RANK per rank
dtype = "bfloat16"
num_frames = 32  # 32 frames * 196 tokens (384 px, 27x27 patches pooled to 14x14) + 1 = 6273 video tokens
batch_size = 8  # 8 videos * ~6.4k prompt tokens per generate call; the KV cache is ~0.4 GB per video in bf16
max_new_tokens = 512  # a detailed description is 150-400 tokens
decode_workers = 4  # per rank: 8 ranks * 4 = 32 PyAV processes; lower it on a node with fewer than ~32 cores
decode_timeout = 120.0
max_side = 768  # decode-time downscale; the model resizes to 384 anyway
