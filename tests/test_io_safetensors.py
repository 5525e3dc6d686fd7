"""The streaming safetensors writer (``routelab.io.write_safetensors``): the bytes safetensors' own
``save_file`` writes, a checksum of what was written, and one tensor held at a time."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import load_file, save_file

from routelab.io import TensorSpec, file_sha256, lazy_tensors, save_state_dict, unique_tensors, write_safetensors


def mixed_state() -> dict[str, torch.Tensor]:
    """Every dtype family, a 0-dim and an empty tensor, a transposed (non-contiguous) one, a non-ASCII name."""
    g = torch.Generator().manual_seed(0)
    return {
        "b": torch.randn(3, 4, generator=g), "a": torch.randn((), generator=g), "empty": torch.zeros(0, 5),
        "h": torch.randn(5, generator=g).half(), "ids": torch.arange(7), "bf": torch.randn(2, 3, generator=g).bfloat16(),
        "mask": torch.tensor([True, False, True]), "f8": torch.randn(3, generator=g).to(torch.float8_e4m3fn),
        "u8": torch.arange(5, dtype=torch.uint8), "é": torch.randn(1, dtype=torch.float64, generator=g),
        "i32": torch.arange(3, dtype=torch.int32), "t": torch.randn(4, 3, generator=g).t(), "i8": torch.tensor([-3], dtype=torch.int8),
        "c": torch.randn(2, dtype=torch.complex64, generator=g), "empty_scalar_row": torch.zeros(1, 0, dtype=torch.int16),
    }


def specs_of(state: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state.items()]


def test_save_state_dict_writes_the_bytes_save_file_writes(tmp_path):
    state = mixed_state()
    state["tied"] = state["b"]  # stored once, as an alias
    digest = save_state_dict(state, tmp_path / "new.safetensors")
    tensors, aliases = unique_tensors(state)
    assert aliases == {"tied": "b"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "ref.safetensors",
              metadata={"routelab_aliases": json.dumps(aliases)})
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert digest == file_sha256(tmp_path / "new.safetensors")
    loaded = load_file(tmp_path / "new.safetensors")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
        assert torch.equal(raw(loaded[k]), raw(v)), k


def raw(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (equal NaNs compare equal, any dtype)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_without_metadata_and_with_several_keys(tmp_path):
    state = mixed_state()
    contiguous = {k: v.contiguous() for k, v in state.items()}
    digest = write_safetensors(tmp_path / "new.safetensors", specs_of(state))
    save_file(contiguous, tmp_path / "ref.safetensors")
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert digest == file_sha256(tmp_path / "new.safetensors")
    # several metadata keys: safetensors orders them differently in every process; ours keeps the given order
    meta = {"z": "1", "a": 'x\n\x01é"\\', "m": "{}"}
    write_safetensors(tmp_path / "meta.safetensors", specs_of(state), meta)
    head = (tmp_path / "meta.safetensors").read_bytes()
    header = json.loads(head[8 : 8 + int.from_bytes(head[:8], "little")])
    assert list(header["__metadata__"].items()) == list(meta.items())
    loaded = load_file(tmp_path / "meta.safetensors")
    assert all(torch.equal(raw(loaded[k]), raw(v)) for k, v in contiguous.items())


def test_a_file_rewritten_through_lazy_tensors_is_the_same_file(tmp_path):
    save_state_dict(mixed_state(), tmp_path / "a.safetensors", metadata={"note": "kept"})
    digest = write_safetensors(tmp_path / "b.safetensors", *lazy_tensors(tmp_path / "a.safetensors"))
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert digest == file_sha256(tmp_path / "a.safetensors")


def test_each_tensor_is_released_before_the_next_is_produced(tmp_path):
    alive: list[weakref.ref] = []

    def produce(shape):
        gc.collect()
        assert all(r() is None for r in alive), "an earlier tensor is still held"
        t = torch.ones(shape)
        alive.append(weakref.ref(t))
        return t

    specs = [TensorSpec(f"w{i}", (i + 1, 3), torch.float32, lambda i=i: produce((i + 1, 3))) for i in range(4)]
    write_safetensors(tmp_path / "w.safetensors", specs)
    assert len(alive) == 4 and load_file(tmp_path / "w.safetensors")["w3"].shape == (4, 3)


def test_a_producer_that_breaks_its_promise_leaves_the_old_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    bad = [TensorSpec("w", (2,), torch.float32, lambda: torch.ones(3))]
    with pytest.raises(ValueError, match=r"'w' was announced as torch.float32 \(2,\) but produced as torch.float32 \(3,\)"):
        write_safetensors(path, bad)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_unsupported_dtype_and_repeated_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"dtype torch.quint8.*allowed: bool, uint8"):
        write_safetensors(tmp_path / "q.safetensors", [TensorSpec("q", (1,), torch.quint8, lambda: None)])
    twice = [TensorSpec("w", (1,), torch.float32, lambda: torch.ones(1))] * 2
    with pytest.raises(ValueError, match=r"tensor names repeat: \['w'\]"):
        write_safetensors(tmp_path / "w.safetensors", twice)
    assert list(tmp_path.iterdir()) == []
