# bench.py with a real judge served by vLLM (OpenAI-compatible, logprobs on), e.g.
#   vllm serve Qwen/Qwen2.5-72B-Instruct --tensor-parallel-size 8        (Video-SafetyBench's judge model)
#   python data/videosafetybench/prepare.py --src=/data/Video-SafetyBench --out=out/vsb_items.jsonl
#   python bench.py config/bench_vllm.py --model=out/dpo/final --out_dir=out/bench_dpo
items = "out/vsb_items.jsonl"
video_root = "/data/Video-SafetyBench"
judge_url = "http://localhost:8000/v1"
judge_model = "Qwen/Qwen2.5-72B-Instruct"
judge_logprobs = True  # RJScore: the score is the expectation over "1".."5" at the score position
concurrency = 64  # judge calls in flight; vLLM batches them
read_timeout = 300.0
device = "cuda"
dtype = "bfloat16"
num_frames = 16
max_new_tokens = 512
batch_size = 16
