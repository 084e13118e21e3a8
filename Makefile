# make test: create .venv if missing, install runtime + test deps (idempotent), run the hermetic CPU test suite.
# make demo: the loop on CPU with no downloads (a tiny VLM pretrained here on synthetic clips, then made safe by DPO).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

# torch first and pinned: the 2.13.0 CPU wheel is on disk here; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -r requirements.txt
	touch $@

# (`kernels` is removed if an older install left it: the HF package of that name shadows / is shadowed by kernels.py)
$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(PY) -m pip uninstall --yes --quiet kernels 2>/dev/null || true
	touch $@

test: $(VENV)/.dev
	$(PY) -m pytest -q tests

# The whole loop on the demo's mini set, each step a plain script run (a rerun resumes every step): clips and true
# captions, the base model's instructions (the offline generator over the true captions), pretraining from scratch,
# then describe -> pairs -> split by video -> dataset card -> bench base -> DPO -> bench aligned -> compare -> the closing table.
# tests/test_demo.py runs the same recipe on a smaller configuration (DEMO_VARIANTS, PRETRAIN_ARGS, DPO_ARGS).
DEMO ?= out/demo
DEMO_VARIANTS ?= 3
PRETRAIN_ARGS ?=
DPO_ARGS ?=
demo: $(VENV)/.runtime
	$(MAKE) --no-print-directory demo-steps

demo-steps:
	$(PY) data/demo/prepare.py --out=$(DEMO) --variants=$(DEMO_VARIANTS)
	$(PY) generate_pairs.py config/pairs_demo.py --descriptions=$(DEMO)/pretrain/captions.jsonl \
		--out=$(DEMO)/pretrain/instructions.jsonl
	$(PY) data/demo/pretrain.py --out=$(DEMO) $(PRETRAIN_ARGS)
	$(PY) describe.py config/describe_demo.py --model=$(DEMO)/model --videos=$(DEMO)/videos \
		--out=$(DEMO)/descriptions.jsonl --progress=False
	$(PY) generate_pairs.py config/pairs_demo.py --descriptions=$(DEMO)/descriptions.jsonl --out=$(DEMO)/pairs.jsonl \
		--split=0.3
	$(PY) generate_pairs.py config/pairs_demo.py --out=$(DEMO)/pairs.jsonl --card=True
	$(PY) bench.py config/bench_demo.py --items=$(DEMO)/pairs.heldout.jsonl --train_pairs=$(DEMO)/pairs.train.jsonl \
		--video_root=$(DEMO)/videos --model=$(DEMO)/model --out_dir=$(DEMO)/bench_base --progress=False
	$(PY) data/demo/gold.py --items=$(DEMO)/pairs.heldout.jsonl --answers=$(DEMO)/bench_base/answers.jsonl \
		--out=$(DEMO)/gold.jsonl
	$(PY) bench.py config/bench_demo.py --items=$(DEMO)/pairs.heldout.jsonl --train_pairs=$(DEMO)/pairs.train.jsonl \
		--answers=$(DEMO)/bench_base/answers.jsonl --gold=$(DEMO)/gold.jsonl --out_dir=$(DEMO)/bench_gold --progress=False
	$(PY) dpo.py config/dpo_demo.py --init_from=$(DEMO)/model --pairs=$(DEMO)/pairs.train.jsonl \
		--video_root=$(DEMO)/videos --out_dir=$(DEMO)/dpo $(DPO_ARGS)
	$(PY) bench.py config/bench_demo.py --items=$(DEMO)/pairs.heldout.jsonl --train_pairs=$(DEMO)/pairs.train.jsonl \
		--video_root=$(DEMO)/videos --model=$(DEMO)/dpo/final --out_dir=$(DEMO)/bench_dpo --progress=False
	$(PY) bench.py config/bench_demo.py --compare=$(DEMO)/bench_base,$(DEMO)/bench_dpo --out_dir=$(DEMO)/bench_cmp
	$(PY) data/demo/prepare.py --out=$(DEMO) --summary=True

# The one GPU check (tests/gpu_check.py, ~5-8 min on one H100/H200): kernel parity at the real tile sizes (stops on a
# miss), then attention / fused_logprobs / DPO-step / generation numbers, one table, gpu_check.json. The node brings
# torch with CUDA, triton, numpy and safetensors (no PyAV, no network needed).
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) tests/gpu_check.py --out=gpu_check.json

.PHONY: test demo demo-steps gpu-check
