# generate_pairs.py with the offline backend: deterministic taxonomy templates, no endpoint, no key.
# A smoke test of the plumbing (CI, the demo), not a model: its pairs teach "refuse with help" vs "comply" only.
#   python generate_pairs.py config/pairs_offline.py --descriptions=out/demo/descriptions.jsonl
descriptions = "out/demo/descriptions.jsonl"
out = "out/demo/pairs.jsonl"
llm_url = "offline"
concurrency = 2  # offline calls are microseconds; threads only exercise the pool
queries_per_video = 4  # one per style: explicit, video_grounded, jailbreak, benign_sensitive
max_rules = 2
