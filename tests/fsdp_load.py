"""Run by tests/test_dpo.py under torchrun (2 gloo ranks): FSDP2 sharded loading of a checkpoint (model.on_meta ->
fully_shard -> model.load_sharded). Prints one JSON line per rank: the rank's peak RSS growth while loading (VmHWM,
reset first) and, on rank 0, the max |logit diff| of the sharded model against a single-process from_pretrained.

    torchrun --nproc_per_node=2 tests/fsdp_load.py CKPT_DIR
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import VLM, load_sharded, setup_runtime  # noqa: E402


def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


path = sys.argv[1]
rank, world, device, _ = setup_runtime("cpu")
from torch.distributed.fsdp import fully_shard  # noqa: E402

# warm-up: what torch allocates once per process the first time it builds on meta, shards and distributes (lazy
# imports and their caches, independent of the model's size) is not the loader's memory
from torch.distributed.tensor import distribute_tensor  # noqa: E402

warm, _, _ = VLM.on_meta(path)
del warm
with torch.device("meta"):
    tiny = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
fully_shard(tiny[0])
fully_shard(tiny)
tiny.to_empty(device=device)
with torch.no_grad():
    tiny[0].weight.copy_(distribute_tensor(torch.ones(8, 8), tiny[0].weight.device_mesh, tiny[0].weight.placements,
                                           src_data_rank=None))
    tiny(torch.ones(2, 8))
del tiny
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (the peak) to the current RSS
before = status_kib("VmRSS")
model, sources, headers = VLM.on_meta(path)
for layer in model.language_model.model.layers:
    fully_shard(layer)
fully_shard(model)
load_sharded(model, sources, headers, device)
peak = (status_kib("VmHWM") - before) * 1024
g = torch.Generator().manual_seed(0)
c = model.config
ids = torch.cat([torch.randint(0, 200, (1, 4), generator=g), torch.full((1, model.num_video_tokens(2)),
                 c.video_token_id), torch.randint(0, 200, (1, 5), generator=g)], 1)
pixels = torch.randn(1, 2, 3, c.vision.image_size, c.vision.image_size, generator=g)
with torch.no_grad():
    logits = model(ids, pixels)
    diff = None
    if rank == 0:
        diff = (logits - VLM.from_pretrained(path)(ids, pixels)).abs().max().item()
print(json.dumps(dict(rank=rank, peak_bytes=peak, diff=diff)), flush=True)
