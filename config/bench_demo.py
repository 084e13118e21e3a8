# bench.py on the demo's mini set: held-out split of the offline pairs, the tiny model, the offline judge (keyword
# refusal rule: a smoke test of the plumbing, not a judge). After generate_pairs.py config/pairs_demo.py --split=0.3
#   (which wrote out/demo/pairs.train.jsonl + pairs.heldout.jsonl, split by video):
#   python bench.py config/bench_demo.py --model=out/demo/model --out_dir=out/demo/bench_base
#   python bench.py config/bench_demo.py --model=<dpo checkpoint> --out_dir=out/demo/bench_dpo
#   python bench.py config/bench_demo.py --compare=out/demo/bench_base,out/demo/bench_dpo --out_dir=out/demo/bench_cmp
items = "out/demo/pairs.heldout.jsonl"
video_root = "out/demo/videos"  # describe.py records `video` relative to the videos directory
train_pairs = "out/demo/pairs.train.jsonl"  # the overlap guard: no held-out video was trained on
judge_url = "offline"
num_frames = 8
max_new_tokens = 24  # the keyword judge reads the opening; the base model learned 24-token answers
batch_size = 12
