# describe.py on the demo's mini set (make demo): the tiny random VLM and synthetic clips of data/demo/prepare.py.
#   python data/demo/prepare.py --out=out/demo && python describe.py config/describe_demo.py
# The model is random: its descriptions are noise; this proves the plumbing.
model = "out/demo/model"
videos = "out/demo/videos"
out = "out/demo/descriptions.jsonl"
num_frames = 8  # 8 frames * 4 tokens (28 px, 7 px patches, pooled 4x4 -> 2x2) + 1 newline = 33 video tokens
batch_size = 4
max_new_tokens = 64
decode_workers = 2
temperature = 1.0  # greedy decoding of the random model picks <|im_end|> first: every description would be empty
