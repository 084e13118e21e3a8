# describe.py on the demo's mini set (make demo): the tiny VLM that data/demo/pretrain.py trained on synthetic clips.
#   python data/demo/prepare.py --out=out/demo && ... && python describe.py config/describe_demo.py
model = "out/demo/model"
videos = "out/demo/videos"
out = "out/demo/descriptions.jsonl"
num_frames = 8  # 8 frames * 4 tokens (28 px, 7 px patches, a 4x4 grid resized to 2x2) + 1 newline = 33 video tokens
batch_size = 12
max_new_tokens = 40  # the captions it learned are ~25 tokens
decode_workers = 1  # the machine has 2 cores
temperature = 0.0  # greedy: the same descriptions on every run
