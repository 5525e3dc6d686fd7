"""Expert parallelism in real processes (gloo on loopback): each process builds and loads only its
own experts. At build time its expert tensors have E / P rows and, gathered, equal the one-process
model's bitwise; a resume reads only its rows of every expert tensor (weights and AdamW moments)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from routelab.io import load_state_dict
from tests.train.test_distributed import MOE, _env, write_tiny

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import routelab.io as io
    import routelab.train.trainer as trainer
    from routelab.config import Config
    from routelab.io import save_state_dict
    from routelab.train import train

    tiny, out, ep, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "resume"
    whole_reads = []  # (file, tensor) read whole
    real_open = io.safe_open

    class Spy:
        def __init__(self, path, *args, **kwargs):
            self.path, self.f = path, real_open(path, *args, **kwargs)
        def __enter__(self):
            self.f.__enter__()
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
        def get_tensor(self, name):
            whole_reads.append((self.path.rsplit("/", 1)[-1], name))
            return self.f.get_tensor(name)
        def __getattr__(self, name):
            return getattr(self.f, name)

    io.safe_open = Spy
    real_build = trainer.build_run

    def build_run(*args, **kwargs):
        run = real_build(*args, **kwargs)
        E = run.cfg.model.ffn.num_experts
        experts = {n: p for n, p in run.model.named_parameters() if ".experts." in n}
        assert experts and all(p.shape[0] == E // ep for p in experts.values()), {n: p.shape for n, p in experts.items()}
        if resume:
            params = [p for g in run.optimizer.param_groups for p in g["params"]]
            ids = {id(p) for p in experts.values()}
            moments = {f"state.{i}." for i, p in enumerate(params) if id(p) in ids}
            moment = lambda n: n.startswith(tuple(moments)) and not n.endswith(".step")  # the 0-d step count is whole
            bad = [(f, n) for f, n in whole_reads if ".experts." in n or moment(n)]
            assert not bad, bad
            assert any(n.startswith("rng.") for _, n in whole_reads)  # the reads were seen
        else:
            full = run.experts.full_state_dict() if run.experts else run.model.state_dict()
            if run.ctx.is_main:
                save_state_dict(full, out + ".init.safetensors")
        return run

    trainer.build_run = build_run
    cfg = Config.load(tiny, [sys.argv[5], f"train.expert_parallel={ep}"])
    train(cfg, out, resume=resume, stop_after=4 if resume else 2)
    print("ok")
    """
)


def _run(nproc: int, *args: str) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    return subprocess.run([sys.executable, *launch, *args], capture_output=True, text=True, env=_env(), timeout=240)


def test_each_process_builds_and_resumes_only_its_experts(tmp_path):
    tiny = write_tiny(tmp_path)
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    ffn = MOE[1]
    one = _run(1, str(script), str(tiny), str(tmp_path / "one"), "1", "fresh", ffn)
    assert one.returncode == 0, one.stderr[-3000:]
    ep = _run(2, str(script), str(tiny), str(tmp_path / "ep"), "2", "fresh", ffn)
    assert ep.returncode == 0, ep.stderr[-3000:]
    a, b = load_state_dict(tmp_path / "one.init.safetensors"), load_state_dict(tmp_path / "ep.init.safetensors")
    assert a.keys() == b.keys() and any(".experts." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise: the same initialisation, experts included
    resumed = _run(2, str(script), str(tiny), str(tmp_path / "ep"), "2", "resume", ffn)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("ok") == 2



