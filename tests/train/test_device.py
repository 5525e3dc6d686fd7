"""routelab.device.to_device, and loading runs and checkpoints onto a chosen device (CPU here;
the same on CUDA in tests/test_cuda_paths.py)."""

import torch

import routelab.train.checkpoint as checkpoint
from routelab.config import ModelConfig, TrainConfig
from routelab.device import to_device
from routelab.model import RoutedTransformer
from routelab.train.optim import build_optimizer


def test_to_device_cpu_keeps_values_and_non_tensors():
    batch = {"input_ids": torch.arange(12).view(3, 4), "labels": torch.ones(3, 4, dtype=torch.long), "task": "lm"}
    out = to_device(batch, "cpu")
    assert out is not batch and set(out) == set(batch) and out["task"] == "lm"
    for k in ("input_ids", "labels"):
        assert out[k].device == torch.device("cpu") and out[k].dtype == batch[k].dtype
        assert torch.equal(out[k], batch[k])
    assert to_device(batch, torch.device("cpu"))["input_ids"].device.type == "cpu"


def test_load_checkpoint_reads_the_weights_onto_the_models_device(tmp_path, monkeypatch):
    """Resuming on another device than the one that wrote the checkpoint: the weights are read with
    map_location = the model's device, so nothing in the file ties them to the writer's device."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    model = RoutedTransformer(cfg)
    path = checkpoint.save_checkpoint(tmp_path, 1, model, build_optimizer(model, TrainConfig()), {"bookkeeping": {}}, keep=1)
    seen = []
    real = checkpoint.load_state_dict

    def spy(p, map_location="cpu", *args, **kwargs):
        seen.append((p.name, torch.device(map_location)))
        return real(p, map_location, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_state_dict", spy)
    fresh = RoutedTransformer(cfg)
    checkpoint.load_checkpoint(path, fresh, None, rng=False)
    assert (checkpoint.MODEL_FILE, torch.device("cpu")) in seen
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
