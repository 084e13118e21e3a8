# DPO of the demo's tiny random VLM on CPU, one process: `make demo` data (data/demo/prepare.py, describe.py,
# generate_pairs.py config/pairs_offline.py), then
#   python dpo.py config/tiny.py
# It proves the plumbing and shows DPO learning (reward accuracy and margins rising on the demo's pairs); the tiny model
# knows nothing about videos.
init_from = "out/demo/model"
pairs = "out/demo/pairs.train.jsonl"  # the demo holds out pairs.heldout.jsonl for bench.py
video_root = "out/demo/videos"  # describe.py records videos relative to the directory it scanned
out_dir = "out/demo/dpo"
num_frames = 4  # 4 frames * 9 tokens (3x3 pooled SigLIP grid) + 1 newline = 37 video tokens per pair
max_len = 512
decode_workers = 1  # the machine has 2 cores: one decodes, one trains
device = "cpu"
dtype = "float32"  # no autocast on CPU: exact and faster than emulated bf16
batch_size = 2
gradient_accumulation_steps = 2  # 2 pairs * 2 micro steps = 4 pairs per step
epochs = 3
learning_rate = 1e-4  # a random tiny model moves fast: margins grow over ~10 steps here; real models use 5e-7
warmup_iters = 2
beta = 0.1
eval_pairs = 8
eval_interval = 10
save_interval = 20
log_interval = 1
