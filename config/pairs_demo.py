# generate_pairs.py in the demo (make demo): the offline backend (taxonomy templates, no endpoint, no key) over the
# tiny model's descriptions, and over the true captions of the pretraining clips (the base model's instructions).
#   python generate_pairs.py config/pairs_demo.py --descriptions=out/demo/descriptions.jsonl --out=out/demo/pairs.jsonl
descriptions = "out/demo/descriptions.jsonl"
out = "out/demo/pairs.jsonl"
llm_url = "offline"
concurrency = 1  # offline calls are microseconds; one worker writes the pairs in input order, so two runs of the
#                 demo write identical files (with 2, completion order varied from run to run)
max_rules = 3  # the rules whose keywords the description hits most (ties broken by a hash)
queries_per_video = 12  # 3 rules x 4 styles (explicit, video_grounded, jailbreak, benign_sensitive): every slot distinct
