"""The import fills a model built without parameter memory (``routelab.pretrained.fill``): every
tensor equals what loading the whole converted checkpoint gives, buffers equal a normal build's,
the parameters the checkpoint lacks get the model's own initialisation, ties stay tied, and a
tensor of the wrong shape is refused with one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from routelab import RoutedTransformer
from routelab.io import DamagedFileError
from routelab.pretrained import convert_hf, from_hf
from routelab.pretrained.fill import empty_model, materialise
from tests.pretrained.helpers import save_bert, save_decoder


def loaded_whole(folder) -> RoutedTransformer:
    """The import as it was: a normally built model, then ``load_state_dict`` of every converted tensor."""
    cfg, state, _ = convert_hf(folder)
    model = RoutedTransformer(cfg)
    model.load_state_dict({**model.state_dict(), **state})
    return model


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2"])
def test_filled_model_equals_the_whole_checkpoint_loaded(tmp_path, family):
    save_decoder(family, tmp_path)
    model, ref = from_hf(tmp_path), loaded_whole(tmp_path)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for name in want:  # RoPE tables (not in the checkpoint, not persistent) included
        assert torch.equal(got[name], want[name]), name
    assert not any(p.is_meta for p in model.parameters()) and all(torch.isfinite(t).all() for t in got.values())
    buffers = dict(model.named_buffers())
    assert {n.rsplit(".", 1)[-1] for n in buffers} >= {"inv_freq", "cos", "sin"}
    for name, b in RoutedTransformer(model.cfg).named_buffers():  # buffers as a normal build computes them
        assert torch.equal(buffers[name], b), name


def test_bf16_checkpoint_converts_per_tensor_to_the_same_model(tmp_path):
    """A bfloat16 checkpoint gives float32 parameters equal to the bf16 values (exact widening)."""
    save_decoder("mixtral", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = from_hf(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    w1 = state["model.layers.1.block_sparse_moe.experts.2.w1.weight"].to(torch.bfloat16).float()
    assert torch.equal(model.layers[1].ffn.experts.w_gate[2], w1.t())
    for name, t in loaded_whole(tmp_path).state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def test_tied_embeddings_stay_tied(tmp_path):
    save_decoder("llama", tmp_path, tie_word_embeddings=True)
    model = from_hf(tmp_path)
    assert model.head.weight is model.tok_emb.weight
    want = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.head.weight, want)


def test_parameters_not_in_the_checkpoint_get_the_models_init(tmp_path):
    """BERT's classification head is new: N(0, init_std) weight, zero bias, as in a new model."""
    save_bert(tmp_path)
    torch.manual_seed(0)
    model = from_hf(tmp_path)
    w, b = model.head.weight, model.head.bias
    assert torch.isfinite(w).all() and torch.equal(b, torch.zeros_like(b))
    assert abs(w.std().item() - model.cfg.init_std) < 0.05 and w.abs().max() > 0
    torch.manual_seed(1)
    assert not torch.equal(from_hf(tmp_path).head.weight, w)  # drawn from the RNG, not a fixed pattern


def test_empty_model_has_no_parameter_memory_and_real_buffers(tmp_path):
    save_decoder("llama", tmp_path)
    cfg = from_hf(tmp_path).cfg
    model = empty_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert all(not b.is_meta for b in model.buffers())
    materialise(model)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_reset_parameters_refuses_modules_with_their_own_init(tmp_path):
    save_decoder("mixtral", tmp_path)
    model = from_hf(tmp_path)
    with pytest.raises(ValueError, match=r"cannot re-initialise 'layers.0.ffn.experts' \(Experts\) alone"):
        model.reset_parameters(["layers.0.ffn.experts.w_in"])


@pytest.mark.parametrize(("family", "tensor", "message"), [
    ("llama", "model.layers.0.mlp.up_proj.weight", r"tensor for layers.0.ffn.w_in.weight has shape \(48, 31\), config.json implies \(48, 32\)"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight",
     r"tensor for layers.1.ffn.experts.w_out\[3\] has shape \(31, 32\), config.json implies \(48, 32\)"),
])
def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, family, tensor, message):
    save_decoder(family, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state[tensor] = state[tensor][:, :31].contiguous()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DamagedFileError, match=message):
        from_hf(tmp_path)
