"""
dpo.py on CPU with the tiny random checkpoint (tests/tiny.py) and real H.264 videos (tests/media.py):
the loss and its gradients against the textbook formulas; the packed layout; validation; prefix-shared log-probs
against the plain model on separate sequences; a short overfit run; precomputed vs live reference; kill -9 and
resume; torchrun with 2 gloo processes against one process; a non-finite loss stopping the run.

    .venv/bin/python -m pytest -q tests/test_dpo.py
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpo
import packing
from media import write_video
from model import VLM
from tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFUSE = "I can't help with that, but here is some safety information."
COMPLY = "A person walks into a kitchen and picks up a knife from the counter."


# -----------------------------------------------------------------------------
# fixtures: one tiny checkpoint, three videos, a pairs file


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.tiny import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("dpo")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    os.makedirs(root / "videos")
    for k in range(3):
        write_video(root / "videos" / f"v{k}.mp4", num_frames=6 + 2 * k)
    records = []
    for k in range(6):  # refuse-with-help is preferred over compliance; prompts and lengths vary
        chosen, rejected = (REFUSE, COMPLY) if k % 2 == 0 else (REFUSE + " Stay safe.", COMPLY[:40] + ".")
        records.append(dict(id=f"p{k}", video=f"v{k % 3}.mp4", prompt=["What happens?", "Describe the video."][k % 2],
                            chosen=chosen, rejected=rejected, category=["weapons", "violence"][k % 2],
                            subcategory="x", rule="r", style="explicit", query_type="harmful"))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in records))
    return dict(root=root, ckpt=ckpt, pairs=str(pairs), videos=str(root / "videos"))


def config(data, out, **over):
    cfg = dict(dpo.DEFAULTS, init_from=data["ckpt"], pairs=data["pairs"], video_root=data["videos"], out_dir=str(out),
               num_frames=2, max_len=256, decode_workers=0, device="cpu", dtype="float32", batch_size=2,
               gradient_accumulation_steps=1, max_iters=4, learning_rate=1e-3, beta=0.1, grad_clip=1.0, seed=0)
    cfg.update(over)
    return cfg


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]

# -----------------------------------------------------------------------------
# loss: the textbook formulas on fixed log-probs, written here with math on Python floats


def test_dpo_loss_matches_textbook():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 - 20 for _ in range(4))
    sig = lambda x: 1 / (1 + math.exp(-x))
    for loss_type, eps, beta in [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5), ("ipo", 0.0, 0.3)]:
        args = [t.clone().requires_grad_() for t in (pc, pr, rc, rr)]
        out = dpo.dpo_loss(*args, beta=beta, loss_type=loss_type, label_smoothing=eps)
        out["losses"].sum().backward()
        for i in range(5):
            h = (pc[i] - pr[i] - rc[i] + rr[i]).item()
            if loss_type == "sigmoid":
                want = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
                dh = -(1 - eps) * beta * (1 - sig(beta * h)) + eps * beta * sig(beta * h)  # d loss / d h
            else:
                want, dh = (h - 1 / (2 * beta)) ** 2, 2 * (h - 1 / (2 * beta))
            assert abs(out["losses"][i].item() - want) < 1e-12, (loss_type, i)
            for arg, sign in zip(args, (1, -1, -1, 1)):  # h = pc - pr - rc + rr
                assert abs(arg.grad[i].item() - sign * dh) < 1e-12, (loss_type, i)
            assert abs(out["rewards_chosen"][i].item() - beta * (pc[i] - rc[i]).item()) < 1e-12
            assert out["rewards_accuracy"][i].item() == float(beta * (pc[i] - rc[i]) > beta * (pr[i] - rr[i]))
    with pytest.raises(ValueError, match="loss_type"):
        dpo.dpo_loss(pc, pr, rc, rr, 0.1, "hinge")


def test_batch_loss_ipo_mean_logps_and_sft_term():
    # IPO on per-token means; sft_weight adds the chosen response's per-token NLL; weights average over pairs
    pc, pr, rc, rr = [torch.tensor(v, dtype=torch.float64) for v in ([-8.0, -3.0], [-9.0, -2.0], [-7.0, -4.0],
                                                                      [-10.0, -2.5])]
    nc, nr, w = torch.tensor([4.0, 2.0], dtype=torch.float64), torch.tensor([3.0, 5.0], dtype=torch.float64), \
        torch.ones(2, dtype=torch.float64)
    cfg = dict(loss_type="ipo", beta=0.25, label_smoothing=0.0, sft_weight=0.5)
    loss, sums, _ = dpo.batch_loss((pc, pr), (rc, rr), (nc, nr), w, cfg)
    want = 0.0
    for i in range(2):
        h = (pc[i] / nc[i] - pr[i] / nr[i]) - (rc[i] / nc[i] - rr[i] / nr[i])
        want += ((h - 1 / (2 * 0.25)) ** 2 + 0.5 * (-pc[i] / nc[i])).item() / 2
    assert abs(loss.item() - want) < 1e-12 and sums["pairs"].item() == 2

# -----------------------------------------------------------------------------
# packing and validation: pure functions over token ids


def test_pack_pairs_layout():
    items = [dict(video="a", prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6, 7, 8]),
             dict(video="b", prompt_ids=[9, 10], chosen_ids=[11], rejected_ids=[12])]
    b = packing.pack_pairs(items, share_prefix=True, pad_id=0, max_pairs=8)  # two videos: a row each
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 2, 0, 0, 0, 0]]
    assert b["layout"].tolist() == [[3, 0, 2, 3], [2, 0, 1, 1]]  # [S, q, c, r]: a pair is a row with an empty query
    T = 8  # chosen from positions 2,3; rejected from 2 (last prompt token), then 5, 6; pair 1: 1 and 1
    assert b["gather"].tolist() == [2, 3, 2, 5, 6, T + 1, T + 1]
    assert b["targets"].tolist() == [4, 5, 6, 7, 8, 11, 12]
    assert b["segment"].tolist() == [0, 0, 1, 1, 1, 2, 3]
    d = packing.pack_pairs(items, share_prefix=False, pad_id=0)
    assert d["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [1, 2, 3, 6, 7, 8], [9, 10, 11, 0, 0, 0],
                                       [9, 10, 12, 0, 0, 0]]
    assert d["layout"].tolist() == [[5, 0, 0, 0], [6, 0, 0, 0], [3, 0, 0, 0], [3, 0, 0, 0]]
    assert d["gather"].tolist() == [2, 3, 6 + 2, 6 + 3, 6 + 4, 12 + 1, 18 + 1]
    assert d["targets"].tolist() == b["targets"].tolist() and d["segment"].tolist() == b["segment"].tolist()


def test_truncate_responses():
    assert packing.truncate_responses(10, [1] * 3, [2] * 4, 20) == ([1] * 3, [2] * 4, False)
    assert packing.truncate_responses(10, [1] * 3, [2] * 9, 20) == ([1] * 3, [2] * 7, True)  # the long one is cut
    assert packing.truncate_responses(10, [1] * 9, [2] * 9, 20) == ([1] * 5, [2] * 5, True)
    assert packing.truncate_responses(19, [1], [2], 20) is None  # the video prefix never gets cut


def test_validate_pairs_counts_and_strict(data, tmp_path):
    tok = Tokenizer.from_pretrained(data["ckpt"])
    good = dict(id="g", video="v0.mp4", prompt="What happens?", chosen=REFUSE, rejected=COMPLY, category="c")
    lines = [json.dumps(good), json.dumps(good), "{not json",
             json.dumps({**good, "id": "a", "chosen": "  "}),
             json.dumps({**good, "id": "b", "rejected": REFUSE + " "}),
             json.dumps({**good, "id": "c", "video": "nope.mp4"}),
             json.dumps({**good, "id": "d", "prompt": "<video> again"}),
             json.dumps({**good, "id": "e", "chosen": "\ud800"}),
             json.dumps({k: v for k, v in good.items() if k != "rejected"} | {"id": "f"}),
             json.dumps({**good, "id": "h", "chosen": COMPLY * 20}),
             json.dumps({**good, "id": "t", "chosen": COMPLY * 3})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    n_video = 900
    items, _ = packing.validate_pairs(str(path), tok, n_video, 10**6, data["videos"])
    g = items[0]  # max_len: exactly what pair g needs, so h and t (longer chosen) get cut
    max_len = len(g["prompt_ids"]) + len(g["chosen_ids"]) + len(g["rejected_ids"])
    items, report = packing.validate_pairs(str(path), tok, n_video, max_len, data["videos"])
    assert [it["id"] for it in items] == ["g", "h", "t"]
    assert report["dropped"] == dict(bad_json=1, missing_field=1, duplicate_id=1, invalid_text=2, empty_response=1,
                                     identical_responses=1, missing_video=1, over_length=0)
    assert report["truncated"] == 2
    for it in items:  # the video is whole, the responses fit, chosen ends with <|im_end|> unless cut
        assert it["prompt_ids"].count(tok.video_token_id) == n_video
        assert len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"]) <= max_len
    assert items[0]["chosen_ids"][-1] == tok.eos_id and items[0]["rejected_ids"][-1] == tok.eos_id
    _, report = packing.validate_pairs(str(path), tok, n_video + 100, max_len, data["videos"])
    assert report["dropped"]["over_length"] == 4  # g, its repeat (no longer a duplicate of a kept pair), h, t
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: invalid pair \(duplicate_id\)"):
        packing.validate_pairs(str(path), tok, n_video, max_len, data["videos"], strict=True)

# -----------------------------------------------------------------------------
# prefix sharing is exact: one packed sequence == two separate sequences through the plain model


def with_pixels(items, model, num_frames=2):
    """Items with their preprocessed frames, decoded here in the test process (video.decode_video)."""
    from video import decode_video
    c = model.config
    return [dict(it, pixels=torch.from_numpy(decode_video(it["video"], num_frames, c.family,
                                                          c.vision.image_size)[0])) for it in items]


def separate_logps(model, item, pixels):
    """Sum of log p(response) for [prompt | response], each run alone through model(...) -> full logits."""
    out = []
    for resp in (item["chosen_ids"], item["rejected_ids"]):
        ids = torch.tensor([item["prompt_ids"] + resp])
        logp = torch.log_softmax(model(ids, pixels[None]).double(), -1)[0]  # (T, V)
        P = len(item["prompt_ids"])
        out.append(sum(logp[P - 1 + k, t].item() for k, t in enumerate(resp)))
    return out


def test_prefix_sharing_equals_separate_sequences(data):
    tok = Tokenizer.from_pretrained(data["ckpt"])
    model = VLM.from_pretrained(data["ckpt"])
    items, _ = packing.validate_pairs(data["pairs"], tok, model.num_video_tokens(2), 256, data["videos"])
    batch_items = with_pixels(items[:3], model)  # different prompt and response lengths: padding is exercised
    scorer = dpo.PairScorer(model)
    with torch.no_grad():
        shared = dpo.pair_logps(scorer, packing.collate(batch_items, True, tok.pad_id), "cpu")
        duplicated = dpo.pair_logps(scorer, packing.collate(batch_items, False, tok.pad_id), "cpu")
        for b, it in enumerate(batch_items):
            want = separate_logps(model, it, it["pixels"])
            for got in (shared, duplicated):
                for branch in (0, 1):
                    assert abs(got[branch][b].item() - want[branch]) <= 1e-5 * max(1.0, abs(want[branch])), \
                        (b, branch, got[branch][b].item(), want[branch])
            assert shared[2][b] == len(it["chosen_ids"]) and shared[3][b] == len(it["rejected_ids"])

def test_unreadable_video_gets_zero_weight(data, tmp_path):
    # exists (so validation keeps it) but is not a video: the pair keeps the batch shape, weighs nothing, is recorded
    tok = Tokenizer.from_pretrained(data["ckpt"])
    items, _ = packing.validate_pairs(data["pairs"], tok, 19, 256, data["videos"])
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video\n" * 10)
    two = [items[0], dict(items[1], video=str(broken))]
    batch = next(packing.load_batches(two, [[0, 1]], (2, "llava_onevision", 35), workers=1, timeout=60.0))
    assert batch["weights"].tolist() == [1.0, 0.0] and batch["errors"][0]["id"] == items[1]["id"]
    assert batch["pixels"][1].abs().sum() == 0
    policy, ref = (torch.tensor([-5.0, -1.0]), torch.tensor([-6.0, -9.0])), (torch.zeros(2), torch.zeros(2))
    counts = (torch.ones(2), torch.ones(2))
    cfg = dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.0, sft_weight=0.0)
    loss, sums, _ = dpo.batch_loss(policy, ref, counts, batch["weights"], cfg)
    alone, _, _ = dpo.batch_loss((policy[0][:1], policy[1][:1]), (ref[0][:1], ref[1][:1]), (counts[0][:1],) * 2,
                                 torch.ones(1), cfg)
    assert loss.item() == alone.item() and sums["pairs"].item() == 1

# -----------------------------------------------------------------------------
# training runs


def test_overfit_and_precomputed_reference_equals_live(data, tmp_path):
    cfg = config(data, tmp_path / "run", max_iters=12, batch_size=3, decode_workers=1, eval_pairs=0,
                 learning_rate=2e-4, min_lr_ratio=1.0)
    summary = dpo.train(cfg)
    assert summary["status"] == "done"
    m = metrics(cfg["out_dir"])
    assert [r["step"] for r in m] == list(range(1, 13))
    # policy == reference at step 1, up to fp32 rounding: the reference pass packed these pairs into other rows
    # (video-grouped rows follow each batch's composition), so sums of ~50-nat log-probs agree to ~1e-6, not bit-exact
    assert abs(m[0]["rewards_margin"]) < 1e-5
    assert abs(m[0]["loss"] - math.log(2)) < 1e-6  # step 1: -log sigmoid(~0)
    assert sum(r["rewards_accuracy"] for r in m[-3:]) / 3 >= 0.9, [r["rewards_accuracy"] for r in m]
    assert m[-1]["loss"] < 0.5 * m[0]["loss"], [r["loss"] for r in m]
    final = VLM.from_pretrained(os.path.join(cfg["out_dir"], "final"))  # an HF dir with the tokenizer files
    assert os.path.isfile(os.path.join(cfg["out_dir"], "final", "tokenizer.json"))
    assert final.config.family == "llava_onevision"
    # the stored reference equals the initial model scored live; the live-reference run logs the same losses
    stored = dpo.load_ref(cfg["out_dir"])
    live = dpo.train(config(data, tmp_path / "live", max_iters=3, batch_size=3, ref="live", learning_rate=2e-4,
                         min_lr_ratio=1.0))
    tok = Tokenizer.from_pretrained(data["ckpt"])
    model = VLM.from_pretrained(data["ckpt"])
    items, _ = packing.validate_pairs(data["pairs"], tok, model.num_video_tokens(2), 256, data["videos"],
                                      num_frames=2)  # the run's frames: part of each pair's reference key
    with torch.no_grad():
        c, r, _, _ = dpo.pair_logps(dpo.PairScorer(model), packing.collate(with_pixels(items, model), True, 0), "cpu")
    for it, ci, ri in zip(items, c.tolist(), r.tolist()):
        assert abs(stored[it["ref_key"]][0] - ci) < 1e-4 and abs(stored[it["ref_key"]][1] - ri) < 1e-4
    for a, b in zip(m[:3], metrics(tmp_path / "live")):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards_margin"] - b["rewards_margin"]) < 1e-5
    assert live["status"] == "done"


def run_script(args, **kw):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, os.path.join(REPO, "dpo.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def cli(cfg):
    return [f"--{k}={v}" for k, v in cfg.items() if k in ("init_from", "pairs", "video_root", "out_dir", "num_frames",
                                                          "max_len", "decode_workers", "device", "dtype", "batch_size",
                                                          "max_iters", "learning_rate", "save_interval", "seed",
                                                          "gradient_accumulation_steps", "keep_checkpoints", "fsdp",
                                                          "activation_checkpointing", "eval_pairs", "eval_interval")]


def final_state(out):
    return VLM.from_pretrained(os.path.join(out, "final")).state_dict()


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def test_kill_and_resume_equals_uninterrupted(data, tmp_path):
    # kill -9 right after ckpt-2, resume; SIGTERM the resumed run after ckpt-4 (it saves at the next step and exits
    # cleanly), resume again: the logged losses and the final weights equal an uninterrupted run's
    base = config(data, tmp_path / "straight", max_iters=10, batch_size=2, gradient_accumulation_steps=2,
                  save_interval=2, keep_checkpoints=20)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script runs below (OMP_NUM_THREADS=1): CPU kernels' rounding depends on threads
    try:
        dpo.train(base)
    finally:
        torch.set_num_threads(threads)
    cfg = dict(base, out_dir=str(tmp_path / "killed"))
    proc = run_script(cli(cfg))
    landed = wait_for(os.path.join(cfg["out_dir"], "ckpt-2", "train_state.json"), proc)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    assert landed and not os.path.isdir(os.path.join(cfg["out_dir"], "final")), "the kill missed the run\n" + log
    proc = run_script(cli(cfg))
    landed = wait_for(os.path.join(cfg["out_dir"], "ckpt-4", "train_state.json"), proc)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    # exit 3: stopped with work left for a rerun (configurator.EXIT_INCOMPLETE)
    assert landed and proc.returncode == 3 and "resuming from" in log and "SIGTERM: saved ckpt-" in log, log
    assert not os.path.isdir(os.path.join(cfg["out_dir"], "final"))
    proc = run_script(cli(cfg))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "resuming from" in log, log
    a, b = metrics(base["out_dir"]), metrics(cfg["out_dir"])
    assert [r["step"] for r in b] == list(range(1, 11))  # every step logged once: nothing redone twice, none skipped
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["rewards_margin"] - y["rewards_margin"]) < 1e-6, (x, y)
    sa, sb = final_state(base["out_dir"]), final_state(cfg["out_dir"])
    assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6) for k in sa)


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    cfg = config(data, tmp_path_factory.mktemp("one") / "run", max_iters=3, batch_size=2, eval_pairs=3,
                 eval_interval=2)
    dpo.train(cfg)
    return cfg


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_gloo_processes_match_one(one_process, tmp_path, mode):
    # 2 ranks x 1 pair = the same global batch as one process with 2 pairs; FSDP2 also checkpoints per layer and
    # writes a sharded optimizer state at step 2
    two = dict(one_process, out_dir=str(tmp_path / mode), batch_size=1)
    if mode == "fsdp":
        two.update(fsdp=True, activation_checkpointing=True, save_interval=2)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "dpo.py"), *cli(two)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if mode == "ddp":
        assert "weights identical on 2 ranks" in proc.stdout
    else:
        assert os.path.isfile(os.path.join(two["out_dir"], "ckpt-2", "optim", ".metadata"))
    # fp32 sums over other batch shapes (2 pairs in one matmul vs 1 per rank): relative 1e-5 (margins reach ~8; with
    # one thread per process the absolute gap on them was 1.1e-5 before this was relative)
    close = lambda a, b: abs(a - b) <= 1e-5 * max(1.0, abs(a))  # noqa: E731
    for x, y in zip(metrics(one_process["out_dir"]), metrics(two["out_dir"]), strict=True):
        assert close(x["loss"], y["loss"]) and close(x["rewards_margin"], y["rewards_margin"]), (x, y)
    # the weight updates agree tensor by tensor (normwise). Not elementwise: Adam divides by sqrt(v), so an embedding
    # row whose gradient is at fp-noise level moves by ~lr either way, and the reduction order (one process sums two
    # pairs, DDP averages two ranks) decides its sign
    init, sa, sb = (VLM.from_pretrained(d).state_dict() for d in (one_process["init_from"],
                                                                  os.path.join(one_process["out_dir"], "final"),
                                                                  os.path.join(two["out_dir"], "final")))
    worst = max(((sa[k] - sb[k]).norm() / (sa[k] - init[k]).norm().clamp(min=1e-12)).item() for k in sa
                if (sa[k] - init[k]).norm() > 0)
    assert worst < 1e-3, worst
    assert all(torch.equal(sa[k], init[k]) == torch.equal(sb[k], init[k]) for k in sa)  # same parts frozen
    # eval at steps 2 and 3 over 3 held-out pairs (split 2 + 1 over the ranks; the short rank runs a padding batch)
    evals = [[r for r in open(os.path.join(out, "metrics.jsonl")) if "eval_loss" in r] for out in
             (one_process["out_dir"], two["out_dir"])]
    for x, y in zip(*map(lambda rows: [json.loads(r) for r in rows], evals), strict=True):
        assert x["step"] == y["step"] and x["eval_pairs"] == y["eval_pairs"] == 3
        assert abs(x["eval_loss"] - y["eval_loss"]) < 1e-5, (x, y)
        assert x["eval_accuracy_by_category"] == y["eval_accuracy_by_category"]
        assert set(x["eval_accuracy_by_category"]) == {"weapons", "violence"}


def test_bfloat16_autocast_trains(data, tmp_path):
    # dtype=bfloat16 without FSDP is torch.autocast: bf16 matmuls and attention, an fp32 residual stream
    dpo.train(config(data, tmp_path / "bf16", max_iters=3, dtype="bfloat16", learning_rate=2e-4, min_lr_ratio=1.0,
                     export_dtype="bfloat16"))
    m = metrics(tmp_path / "bf16")
    with open(tmp_path / "bf16" / "final" / "config.json") as f:  # trained in fp32, exported in the asked dtype
        assert json.load(f)["dtype"] == "bfloat16"
    assert abs(m[0]["loss"] - math.log(2)) < 1e-2 and m[-1]["loss"] < m[0]["loss"] and m[-1]["rewards_accuracy"] == 1


def test_non_finite_loss_names_step_and_pairs(data, tmp_path):
    from safetensors.torch import load_file, save_file
    import shutil
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(data["ckpt"], bad)
    state = load_file(bad / "model.safetensors")
    name = next(k for k in state if "layers.0.mlp.down_proj" in k)
    state[name][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(pairs \['p\d', 'p\d'\] on rank 0\)"):
        dpo.train(config(data, tmp_path / "nan", init_from=str(bad), ref="live"))
    assert not os.path.isdir(tmp_path / "nan" / "final")


def kill_tree(pid):
    """SIGKILL `pid` and every descendant (found through /proc), children first seen, all at once."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        tree += frontier
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_fsdp2_kill_and_resume_equals_uninterrupted(data, tmp_path):
    """FSDP2 on 2 gloo ranks: kill -9 of the whole torchrun group once ckpt-2 is complete, leftovers of a kill
    mid-save planted (a ckpt-<n>.tmp and a higher checkpoint without train_state.json), resume: it starts from the
    last complete checkpoint, and the losses and final weights equal an uninterrupted FSDP2 run's."""
    import shutil
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(REPO, "dpo.py")]
    base = config(data, tmp_path / "straight", max_iters=16, batch_size=1, fsdp=True, save_interval=2,
                  keep_checkpoints=10)
    straight = subprocess.run(torchrun + cli(base), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    cfg = dict(base, out_dir=str(tmp_path / "killed"))
    proc = subprocess.Popen(torchrun + cli(cfg), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    landed = wait_for(os.path.join(cfg["out_dir"], "ckpt-2", "train_state.json"), proc, timeout=300)
    kill_tree(proc.pid)  # torchrun and both ranks (torchrun starts each rank in a session of its own)
    log = proc.communicate(timeout=60)[0]
    assert landed and not os.path.isdir(os.path.join(cfg["out_dir"], "final")), "the kill missed the run\n" + log
    last = dpo.latest_checkpoint(cfg["out_dir"])
    step = int(last.rsplit("-", 1)[1])
    if not os.path.exists(f"{last[:-len(str(step))]}{step + 2}.tmp"):
        shutil.copytree(last, f"{last[:-len(str(step))]}{step + 2}.tmp")  # a save killed before its rename
    cut = os.path.join(cfg["out_dir"], "ckpt-98")
    shutil.copytree(last, cut)
    os.remove(os.path.join(cut, "train_state.json"))  # a checkpoint without its last file: incomplete, ignored
    resumed = subprocess.run(torchrun + cli(cfg), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {last} at step {step}" in resumed.stdout
    a, b = metrics(base["out_dir"]), metrics(cfg["out_dir"])
    assert [r["step"] for r in b] == list(range(1, 17))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6 and abs(x["rewards_margin"] - y["rewards_margin"]) < 1e-6, (x, y)
    sa, sb = final_state(base["out_dir"]), final_state(cfg["out_dir"])
    assert all(torch.allclose(sa[k], sb[k], rtol=0, atol=1e-6) for k in sa)


# -----------------------------------------------------------------------------
# video-grouped rows: [video prefix | q1 c1 r1 | ... | qk ck rk] equals k per-pair rows


@pytest.mark.parametrize("train_vision", [False, True])
def test_grouped_row_equals_per_pair_rows(data, train_vision):
    """k = 1..5 pairs of one video with ragged queries and responses: per-pair log-probs, the DPO loss and every
    parameter gradient of one grouped row equal the per-pair rows' (fp32, 1e-5 relative), frozen or trainable tower;
    the grouped row is one row, and the vision tower sees the video once."""
    from video import decode_video
    tok, model = Tokenizer.from_pretrained(data["ckpt"]), VLM.from_pretrained(data["ckpt"])
    model.vision_tower.requires_grad_(train_vision)
    g = torch.Generator().manual_seed(0)
    c = model.config
    pixels = torch.from_numpy(decode_video(os.path.join(data["videos"], "v0.mp4"), 2, c.family, c.vision.image_size)[0])
    low = min(tok.special.values())
    rand = lambda n: torch.randint(0, low, (n,), generator=g).tolist()  # noqa: E731
    queries = ["What happens?", "Describe the video in detail please.", "Is it safe?", "Who?", "Tell me how, step by step."]
    items = [dict(id=f"x{k}", video="v0.mp4", category="c", pixels=pixels,
                  prompt_ids=tok.video_prompt(queries[k], model.num_video_tokens(2)),
                  chosen_ids=rand(1 + 3 * k % 7), rejected_ids=rand(2 + 5 * k % 6)) for k in range(5)]
    scorer = dpo.PairScorer(model)

    def run(batch):
        model.zero_grad(set_to_none=True)
        pc, pr, nc, nr = dpo.pair_logps(scorer, batch, "cpu")
        loss = dpo.dpo_loss(pc, pr, torch.zeros_like(pc) - 3, torch.zeros_like(pr) - 4, 0.1)["losses"].mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return torch.stack([pc, pr, nc, nr]).detach(), loss.detach(), grads

    for k in range(1, 6):
        grouped = packing.collate(items[:k], True, 0, max_pairs=8)
        per_pair = packing.collate(items[:k], True, 0, max_pairs=1)
        assert grouped["input_ids"].shape[0] == 1 and per_pair["input_ids"].shape[0] == k
        assert grouped["pixels"].shape[0] == 1 and grouped["layout"].shape == (1, 1 + 3 * k)
        a, b = run(grouped), run(per_pair)
        assert torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-5), (k, a[0], b[0])
        assert abs(a[1] - b[1]) <= 1e-5 * abs(b[1])
        assert a[2].keys() == b[2].keys() and ("vision_tower" in "".join(a[2])) == train_vision
        # floor: k_proj biases have an analytically zero gradient (softmax ignores a shift shared by all keys), so
        # theirs is rounding noise (~1e-10); 1e-8 of the model's largest gradient bounds it
        floor = 1e-8 * max(t.abs().max() for t in b[2].values())
        for name in a[2]:
            scale = b[2][name].abs().max()
            assert (a[2][name] - b[2][name]).abs().max() <= 1e-5 * scale + floor, (k, name)


def test_grouped_training_equals_per_pair_training(data, tmp_path):
    """The same pairs at every step (whole video groups, one order): group_by_video on and off log the same losses."""
    kw = dict(max_iters=4, batch_size=2, gradient_accumulation_steps=1, learning_rate=2e-4, min_lr_ratio=1.0)
    dpo.train(config(data, tmp_path / "grouped", group_by_video=True, **kw))
    dpo.train(config(data, tmp_path / "rows", group_by_video=False, **kw))
    for x, y in zip(metrics(tmp_path / "grouped"), metrics(tmp_path / "rows"), strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5 * max(1.0, abs(y["loss"])), (x, y)
        assert abs(x["rewards_margin"] - y["rewards_margin"]) <= 1e-5 * max(1.0, abs(y["rewards_margin"])), (x, y)


def test_video_groups_and_row_runs():
    item = lambda v, p, c=2, r=3: dict(video=v, prompt_ids=p, chosen_ids=[9] * c, rejected_ids=[8] * r)  # noqa
    items = [item("a", [1, 2, 3, 4]), item("b", [1, 2, 5]), item("a", [1, 2, 3, 7, 7]), item("a", [1, 2, 3, 6]),
             item("b", [1, 2, 6])]
    assert packing.video_groups(items, 8, 100) == [[0, 2, 3], [1, 4]]  # by video, file order kept within one
    assert packing.video_groups(items, 2, 100) == [[0, 2], [3], [1, 4]]
    # a row [S | q c r ...]: S = 3 shared, then (1+2+3) + (2+2+3) = 16 tokens for pairs 0 and 2; a third pair makes 22
    ordered = [items[i] for i in (0, 2, 3)]
    assert packing.row_runs(ordered, 8, 16) == [[0, 1], [2]] and packing.row_runs(ordered, 8, 22) == [[0, 1, 2]]
    b = packing.pack_pairs(ordered, max_pairs=8)
    assert b["layout"].tolist() == [[3, 1, 2, 3, 2, 2, 3, 1, 2, 3]]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 3, 4, 5, 6, 5, 6, 7, 3, 4, 5, 4, 5, 6]


def test_fsdp2_sharded_loading_memory_and_logits(tmp_path):
    """A ~140 MB fp32 checkpoint (24 decoder layers, no tensor over 2 MB) loaded by 2 gloo ranks with FSDP2: each rank's
    peak RSS growth while loading stays under 0.6x the checkpoint (its half + one tensor; a full load is 1x), and the
    sharded model's logits equal the single-process model's."""
    from model import init_weights, parse_config
    from tests.tiny import make_tiny_checkpoint
    tiny = make_tiny_checkpoint(tmp_path / "tiny", tokenizer=False)
    with open(os.path.join(tiny, "config.json")) as f:
        raw = json.load(f)
    raw["text_config"].update(hidden_size=384, intermediate_size=1024, num_hidden_layers=24, num_attention_heads=8,
                              num_key_value_heads=2)
    with torch.device("meta"):
        big = VLM(parse_config(raw))
    big = init_weights(big.to_empty(device="cpu"))
    big.config.raw = raw
    big.source_dir = None
    path = str(tmp_path / "big")
    big.save_pretrained(path)
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    largest = max(p.numel() * 4 for p in big.parameters())
    assert size > 100e6 and largest < 0.02 * size
    del big
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(REPO, "tests", "fsdp_load.py"), path], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    print(f"checkpoint {size} bytes; per rank: {ranks}")
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["peak_bytes"] <= 0.6 * size, (r, size)
    assert next(r["diff"] for r in ranks if r["rank"] == 0) <= 1e-5
