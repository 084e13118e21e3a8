# generate_pairs.py against a local vLLM OpenAI-compatible server, e.g.
#   vllm serve Qwen/Qwen2.5-72B-Instruct --tensor-parallel-size 8 --max-num-seqs 256
#   OPENAI_API_KEY=unused python generate_pairs.py config/pairs_vllm.py --dry_run=True   # calls, tokens, cost
#   python generate_pairs.py config/pairs_vllm.py --shard=0/4 --out=out/pairs.0.jsonl    # one of 4 processes
descriptions = "out/descriptions.jsonl"
out = "out/pairs.jsonl"
llm_url = "http://localhost:8000/v1"
llm_model = "Qwen/Qwen2.5-72B-Instruct"
concurrency = 64  # descriptions in flight; vLLM batches them (≈ 64 streams x 14 calls each per video)
queries_per_video = 4  # 4 pairs per video at 3.5 calls per pair: 350,000 pairs = 87,500 videos, 1.2 M calls
temperature = 0.7
max_tokens = 600
read_timeout = 300.0  # a long queue behind a busy batch is normal for a local server
retry_after_max = 300.0
price_prompt = 0.0  # self-hosted: no per-token price
price_completion = 0.0
