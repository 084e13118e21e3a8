# DPO of the demo's base model (make demo) on CPU, one process, on the training side of the split:
#   python dpo.py config/dpo_demo.py --init_from=out/demo/model --pairs=out/demo/pairs.train.jsonl
# A from-scratch 0.5M-parameter model needs a large step (real 7B models use 5e-7 with beta 0.1).
init_from = "out/demo/model"
pairs = "out/demo/pairs.train.jsonl"
video_root = "out/demo/videos"  # describe.py records videos relative to the directory it scanned
out_dir = "out/demo/dpo"
num_frames = 8  # as describe.py and bench.py see the clips
max_len = 512
decode_workers = 1  # the machine has 2 cores: one decodes, one trains
device = "cpu"
dtype = "float32"  # no autocast on CPU: exact and faster than emulated bf16
batch_size = 8
gradient_accumulation_steps = 1  # 8 pairs per step
epochs = 3  # 3 x ~31 steps of 8 pairs
learning_rate = 1e-3
warmup_iters = 5
beta = 0.1
sft_weight = 1.0  # + NLL of the chosen answer (RPO): measured, pure DPO reached 56% held-out safety here, 100% with it
eval_pairs = 0
log_interval = 5
