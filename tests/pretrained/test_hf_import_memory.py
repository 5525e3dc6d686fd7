"""The Hugging Face import's peak memory: about one model, not two.

A ~170 MB float32 Llama checkpoint (built with transformers) is imported in a fresh process whose
peak RSS (VmHWM) is reset just before ``from_hf`` (``/proc/self/clear_refs`` "5", Linux); the peak
growth must stay under 1.5x the checkpoint's size. Building a random model first and holding every
converted tensor beside it peaked at about 2x."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrained.helpers import save_decoder, transformers

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1.5  # peak RSS growth / checkpoint size

CHILD = r"""
import sys
from pathlib import Path

import torch
from routelab.pretrained import from_hf

def mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)

from_hf(sys.argv[1])  # a tiny import first: the libraries' one-off memory (~80 MB of lazy imports) is not counted
Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
before = mb("VmRSS")
model = from_hf(sys.argv[2])
print(mb("VmHWM") - before, sum(p.numel() for p in model.parameters()))
"""


def can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_growth_mb(warm_up: Path, folder: Path) -> tuple[float, int]:
    """(peak RSS growth in MB, parameters) of ``from_hf(folder)`` in a fresh one-thread process that
    has imported ``warm_up`` first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(warm_up), str(folder)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    growth, params = proc.stdout.split()
    return float(growth), int(params)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not can_reset_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_import_peak_memory_is_under_one_and_a_half_checkpoints(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "big", safe_serialization=True)
    save_decoder("llama", tmp_path / "tiny")
    size_mb = (tmp_path / "big" / "model.safetensors").stat().st_size / 2**20
    assert size_mb > 100  # large enough that the libraries' own memory is noise
    growth, params = peak_growth_mb(tmp_path / "tiny", tmp_path / "big")
    print(f"checkpoint {size_mb:.0f} MB, import peak RSS growth {growth:.0f} MB ({growth / size_mb:.2f}x)")
    assert params * 4 / 2**20 == pytest.approx(size_mb, rel=0.01)  # every tensor imported, as float32
    assert growth < LIMIT * size_mb
