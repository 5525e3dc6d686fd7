"""The same computations on CUDA as on the CPU (marker ``cuda``: skipped where torch sees no GPU, see
``tests/conftest.py``; run them with ``pytest -m cuda``).

Every attention kind and every MoE router, forward and backward, against the same module's weights on
the CPU (fp32, atol 1e-4); a tiny training run on ``train.device: cuda`` (dense and MoE LM); greedy
generation against the CPU's; loading a run and a checkpoint across devices; and the attention and MoE
benchmarks at tiny sizes. FlexAttention on CUDA has its own tests (``tests/attention/test_flex_backend.py``):
here kinds with a ``backend`` option run the block-sparse engine, the path autograd uses with padding.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from routelab import ModelConfig
from routelab.attention import build_attention
from routelab.config import Config
from routelab.generate import SamplingConfig, generate
from routelab.model import RoutedTransformer
from routelab.moe import MoE
from routelab.moe.routers import ROUTERS
from routelab.registry import ATTENTION
from tests.moe.router_options import OPTIONS as MOE_OPTIONS

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # fp32; the GPU sums in another order (and TF32 is off: see _fp32)

H, HD, T = 4, 8, 64  # heads, head dim, tokens (8 blocks of 8)
ATTENTION_OPTIONS = {  # kind -> options for T = 64 (blocks of 8, so every sparse kind skips something)
    "dense": {},
    "local": dict(window=8, block_size=8),
    "strided": dict(stride=8, window=8, block_size=8),
    "fixed": dict(stride=8, summary=2),
    "longformer": dict(window=8, global_tokens=[0, 5], block_size=8),
    "bigbird": dict(block_size=8, window_blocks=3, num_global_blocks=1, num_random_blocks=2),
    "synthesizer": dict(variant="dense"),
    "kmeans": dict(num_clusters=4, local_heads=1, window=8, block_size=8),
    "moba": dict(block_size=8, top_k=2),
    "block_topp": dict(block_size=8, top_p=0.9, max_blocks=3),
}
RANDOM_IN_TRAINING = {"gshard", "random"}  # draw from the device's RNG in training: CPU and CUDA draws differ


@pytest.fixture(autouse=True)
def _fp32():
    """Plain fp32 matmuls on the GPU (no TF32), so a 1e-4 tolerance means something."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_every_attention_kind_and_router_is_covered():
    assert set(ATTENTION_OPTIONS) == set(ATTENTION.names())
    assert set(ROUTERS.names()) >= set(MOE_OPTIONS)


# ----------------------------------------------------------------------------------------------
# attention


def _attention(kind: str, causal: bool):
    options = dict(ATTENTION_OPTIONS[kind], kind=kind)
    if "backend" in {f for f in ATTENTION.get(kind).config_class.__dataclass_fields__}:
        options["backend"] = "engine"
    cfg = ModelConfig(
        vocab_size=11, d_model=H * HD, n_heads=H, max_seq_len=T, causal=causal,
        head="lm" if causal else "classification", num_labels=None if causal else 2, attention=options,
    )
    torch.manual_seed(0)
    return build_attention(cfg, layer_idx=1).eval()  # eval: kmeans' centroids stay put, no dropout


def _attend(module, x, padding, device):
    """Output and the gradients of x and every parameter, for a fixed random output gradient."""
    module = module.to(device)
    x = x.detach().to(device).requires_grad_(True)
    pad = padding.to(device) if padding is not None else None
    out = module(x, padding_mask=pad)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    if pad is not None:
        gy = gy.masked_fill(pad[..., None], 0.0)  # padded rows' outputs are unspecified
    (out * gy).sum().backward()
    grads = {n: p.grad.detach().cpu() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach().cpu(), x.grad.detach().cpu(), grads


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", list(ATTENTION_OPTIONS))
def test_attention_kind_on_cuda_equals_cpu(kind, causal):
    cpu = _attention(kind, causal)
    gpu = copy.deepcopy(cpu)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, T, H * HD, generator=g)
    padding = None
    if not causal:  # an encoder batch with padding at the end of row 1
        padding = torch.zeros(2, T, dtype=torch.bool)
        padding[1, T - 5 :] = True
    out_c, gx_c, gp_c = _attend(cpu, x, padding, "cpu")
    out_g, gx_g, gp_g = _attend(gpu, x, padding, "cuda")
    real = torch.ones(2, T, dtype=torch.bool) if padding is None else ~padding
    torch.testing.assert_close(out_g[real], out_c[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(gx_g, gx_c, atol=ATOL, rtol=0)
    assert gp_g.keys() == gp_c.keys() and gp_c
    for n in gp_c:
        torch.testing.assert_close(gp_g[n], gp_c[n], atol=ATOL, rtol=0, msg=n)


# ----------------------------------------------------------------------------------------------
# MoE

D, E, HID, V = 16, 4, 32, 50


def _moe(router: str):
    torch.manual_seed(0)
    return MoE(d_model=D, num_experts=E, hidden=HID, router=router, vocab_size=V, **MOE_OPTIONS.get(router, {}))


def _moe_step(moe, x, ids, device):
    moe = moe.to(device)
    x = x.detach().to(device).requires_grad_(True)
    out = moe(x, token_ids=ids.to(device))
    gy = torch.randn(out.hidden.shape, generator=torch.Generator().manual_seed(5)).to(device)
    ((out.hidden * gy).sum() + out.aux_loss).backward()
    grads = {n: p.grad.detach().cpu() for n, p in moe.named_parameters() if p.grad is not None}
    stats = {k: v.detach().cpu() for k, v in out.stats.items()}
    for k, v in out.stats.items():  # statistics stay on the device (no host sync in the forward)
        assert v.device.type == torch.device(device).type, k
    return out.hidden.detach().cpu(), out.aux_loss.detach().cpu(), x.grad.detach().cpu(), grads, stats


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("router", ROUTERS.names())
def test_moe_router_on_cuda_equals_cpu(router, training):
    cpu = _moe(router).train(training)
    gpu = copy.deepcopy(cpu)
    g = torch.Generator().manual_seed(3)
    x, ids = torch.randn(2, 9, D, generator=g), torch.randint(0, V, (2, 9), generator=g)
    c = _moe_step(cpu, x, ids, "cpu")
    y = _moe_step(gpu, x, ids, "cuda")
    if training and router in RANDOM_IN_TRAINING:  # other draws: only check that it ran and is finite
        assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all() and y[3]
        return
    torch.testing.assert_close(y[0], c[0], atol=ATOL, rtol=0)  # hidden
    torch.testing.assert_close(y[1], c[1], atol=ATOL, rtol=0)  # aux loss
    torch.testing.assert_close(y[2], c[2], atol=ATOL, rtol=0)  # grad of x
    assert y[3].keys() == c[3].keys()
    for n in c[3]:
        torch.testing.assert_close(y[3][n], c[3][n], atol=ATOL, rtol=0, msg=n)
    assert y[4].keys() == c[4].keys()
    for k in c[4]:
        torch.testing.assert_close(y[4][k].double(), c[4][k].double(), atol=ATOL, rtol=0, msg=k)


def test_moe_padding_and_capacity_stats_on_cuda():
    """The dropped / unrouted fractions (device tensors now) equal the CPU's, with padding and capacity."""
    torch.manual_seed(0)
    cpu = MoE(d_model=D, num_experts=E, hidden=HID, router="topk", top_k=2, capacity_factor=0.5).eval()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 9, D)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    a, b = cpu(x, padding_mask=pad), gpu(x.cuda(), padding_mask=pad.cuda())
    assert float(a.stats["dropped_fraction"]) > 0
    for k in ("dropped_fraction", "unrouted_fraction", "tokens_per_expert"):
        assert b.stats[k].is_cuda
        torch.testing.assert_close(b.stats[k].cpu(), a.stats[k], msg=k)
    soft_cpu = _moe("soft").eval()
    soft_gpu = copy.deepcopy(soft_cpu).cuda()
    a, b = soft_cpu(x, padding_mask=pad), soft_gpu(x.cuda(), padding_mask=pad.cuda())
    torch.testing.assert_close(b.stats["router_entropy"].cpu(), a.stats["router_entropy"], atol=1e-5, rtol=0)


def test_balanced_hash_table_stays_on_the_device():
    moe = MoE(d_model=D, num_experts=E, hidden=HID, router={"kind": "hash", "table": "balanced"}, vocab_size=V).cuda()
    counts = torch.arange(V, dtype=torch.float64, device="cuda")
    assert moe.router.prepare(lambda: counts)
    assert moe.router.table.is_cuda
    out = moe(torch.randn(1, 5, D, device="cuda"), token_ids=torch.randint(0, V, (1, 5), device="cuda"))
    assert out.hidden.is_cuda


# ----------------------------------------------------------------------------------------------
# models: generation, training, loading runs


def _lm(ffn: dict | None = None, attention: dict | None = None) -> RoutedTransformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=48,
                      ffn=ffn or {"kind": "dense"}, attention=attention or {"kind": "dense"})
    return RoutedTransformer(cfg).eval()


@pytest.mark.parametrize(
    "ffn, attention",
    [
        (None, None),
        ({"kind": "moe", "num_experts": 4, "router": {"kind": "topk", "top_k": 2}}, None),
        (None, {"kind": "moba", "block_size": 8, "top_k": 2}),
        ({"kind": "moe", "num_experts": 4, "router": "switch"}, {"kind": "local", "window": 8, "block_size": 8}),
    ],
)
def test_greedy_generation_on_cuda_equals_cpu(ffn, attention):
    cpu = _lm(ffn, attention)
    gpu = copy.deepcopy(cpu).cuda()
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(4))
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0)
    a = generate(cpu, prompt, cfg)
    b = generate(gpu, prompt.cuda(), cfg)
    assert b.is_cuda and torch.equal(b.cpu(), a)


def _train_config(corpus: Path, ffn: dict) -> Config:
    return Config.from_dict({
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "ffn": ffn},
        "data": {"source": str(corpus), "seq_len": 32, "val_fraction": 0.1},
        "train": {"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 2, "eval_every": 4,
                  "eval_batches": 2, "checkpoint_every": 4, "progress": False, "device": "cuda"},
    })


@pytest.mark.parametrize(
    "ffn", [{"kind": "dense"}, {"kind": "moe", "num_experts": 4, "router": {"kind": "topk", "top_k": 2}}], ids=["dense", "moe"]
)
def test_training_run_on_cuda_fp32(tmp_path, ffn):
    from routelab.train import evaluate, load_run, train
    from routelab.train.checkpoint import latest_checkpoint, load_checkpoint

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    summary = train(_train_config(corpus, ffn), tmp_path / "run")
    assert summary["completed"] and summary["steps"] == 8
    assert summary["val_bpb"] == summary["val_bpb"] and summary["val_bpb"] < 8  # finite, learned something
    # the run opens on its own device (train.device cuda) and, when asked, on the CPU: same numbers
    on_gpu = load_run(tmp_path / "run", with_data=True, map_location=None)
    assert next(on_gpu.model.parameters()).is_cuda
    on_cpu = load_run(tmp_path / "run", with_data=True, map_location="cpu")
    a = evaluate(on_gpu.model, on_gpu.data, on_gpu.cfg, split="val", max_batches=2)
    b = evaluate(on_cpu.model, on_cpu.data, on_cpu.cfg, split="val", max_batches=2)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    # a checkpoint written on the GPU loads into a CPU model (resume on another device)
    ckpt = latest_checkpoint(tmp_path / "run")
    model = RoutedTransformer(on_cpu.cfg.model)
    load_checkpoint(ckpt, model, None, rng=False)
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(tmp_path, precision):
    """train.precision on the GPU with MoE experts (grouped_mm under autocast) and moba attention
    (FlexAttention, head dim 16): it learns, stays near fp32, and writes float32 weights."""
    from routelab.io import load_state_dict
    from routelab.train import read_metrics, train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 120)
    ffn = {"kind": "moe", "num_experts": 4, "router": {"kind": "topk", "top_k": 2}}
    runs = {}
    for p in ("fp32", precision):
        cfg = _train_config(corpus, ffn)
        cfg = Config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "n_heads": 2,  # head dim 16 for FlexAttention
                                "attention": {"kind": "moba", "block_size": 8, "top_k": 2}},
                                "train": {**cfg.to_dict()["train"], "precision": p}})
        runs[p] = train(cfg, tmp_path / p)
    low = runs[precision]
    assert low["completed"] and low["precision"] == precision
    assert abs(low["val_loss"] / runs["fp32"]["val_loss"] - 1) < 0.05
    weights = load_state_dict(tmp_path / precision / "model" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    scales = [r.get("loss_scale") for r in read_metrics(tmp_path / precision) if "split" not in r]
    assert (None not in scales) == (precision == "fp16")


def test_cli_eval_and_generate_with_device_cuda(tmp_path, capsys):
    from routelab.cli import main
    from routelab.train import train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 60)
    cfg = _train_config(corpus, {"kind": "dense"})
    cfg.train.device = "cpu"  # written on the CPU, read on the GPU
    train(cfg, tmp_path / "run")
    capsys.readouterr()
    run = str(tmp_path / "run")
    assert main(["eval", run, "--device", "cuda"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert main(["eval", run, "--device", "cpu"]) == 0
    assert gpu["loss"] == pytest.approx(json.loads(capsys.readouterr().out)["loss"], abs=1e-4)
    args = ["generate", run, "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]
    assert main([*args, "--device", "cuda"]) == 0
    text = capsys.readouterr().out
    assert main([*args, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == text
    assert main(["eval", run, "--device", f"cuda:{torch.cuda.device_count()}"]) == 2  # no such GPU: one line
    assert "CUDA device(s)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# benchmarks at tiny sizes


def _script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_attention_benchmark_runs_on_cuda(tmp_path):
    out = tmp_path / "attention.json"
    done = _script("benchmarks/attention.py", "--device", "cuda", "--sizes", "512", "--repeats", "1",
                   "--kinds", "local", "moba", "block_topp", "kmeans", "--backend", "engine", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["kind"] for r in rows} >= {"local", "moba", "block_topp", "kmeans"}
    assert all(r["device"] == "cuda" for r in rows)


def test_moe_benchmark_runs_on_cuda(tmp_path):
    out = tmp_path / "moe.json"
    done = _script("benchmarks/moe_layer.py", "--device", "cuda", "--cases", "e8-top2", "--activations", "relu",
                   "--reps", "1", "--warmup", "1", "--no-memory", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and rows[0]["device"] == "cuda"


def test_gpu_step_benchmark_runs_in_bf16(tmp_path):
    out = tmp_path / "step.json"
    done = _script("benchmarks/gpu_step.py", "--device", "cuda", "--seq-len", "256", "--batch", "1", "--d-model", "128",
                   "--layers", "1", "--experts", "8", "--steps", "1", "--warmup", "1", "--attention", "local",
                   "--precision", "bf16", "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["attention"] for r in rows] == ["dense", "local"] and all(r["tokens_per_s"] > 0 for r in rows)
