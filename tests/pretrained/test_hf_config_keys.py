"""Every ``config.json`` key is mapped, known to be inert, or refused (``routelab.pretrained.hf_keys``):
scaled or partial RoPE in every spelling, windows and per-layer kinds the import does not give, and
unknown keys are refused with one line; harmless keys and transformers' defaults import exactly."""

from __future__ import annotations

import json

import pytest
import torch

from routelab import RoutedTransformer
from routelab.cli import main
from routelab.pretrained import from_hf
from routelab.pretrained.hf import FAMILIES
from routelab.pretrained.hf_keys import KEYS
from tests.pretrained.helpers import VOCAB, save_decoder, transformers

ATOL = 1e-4


def edit_config(folder, drop=(), **values):
    """Rewrite ``folder/config.json``: ``drop`` keys removed, ``values`` set."""
    path = folder / "config.json"
    c = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    path.write_text(json.dumps({**c, **values}))


def import_error(tmp_path, capsys) -> str:
    """``routelab import hf`` of ``tmp_path/hf``: it must fail with exactly one line; that line."""
    capsys.readouterr()
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("routelab: error: config.json "), err
    assert not (tmp_path / "run").exists()
    return err[0]


def assert_imports_exactly(folder) -> RoutedTransformer:
    """Our import of ``folder`` computes what transformers loads from the same folder."""
    model = from_hf(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(x).logits
        assert (model(x).logits - want).abs().max() < ATOL
    assert want.abs().max() > 0.5
    return model


def test_every_family_has_a_key_table():
    assert set(KEYS) == set(FAMILIES)


SCALED = {"linear": {"factor": 2.0}, "dynamic": {"factor": 2.0},
          "yarn": {"factor": 2.0, "original_max_position_embeddings": 32},
          "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}


@pytest.mark.parametrize("kind", sorted(SCALED))
def test_scaled_rope_beside_the_new_rope_parameters_is_refused(tmp_path, capsys, kind):
    """transformers 5 writes ``rope_parameters`` (rope_type default); a ``rope_scaling`` beside it is
    what transformers applies, so it must be refused, not skipped (it imported silently wrong)."""
    save_decoder("llama", tmp_path / "hf")
    edit_config(tmp_path / "hf", rope_scaling={"rope_type": kind, **SCALED[kind]})
    line = import_error(tmp_path, capsys)
    assert f"rope_scaling.rope_type={kind!r} is not supported by the import; supported: 'default' (plain RoPE)" in line


@pytest.mark.parametrize("where", ["rope_parameters", "rope_scaling"])
def test_scaled_rope_in_either_spelling_names_key_and_value(tmp_path, capsys, where):
    save_decoder("llama", tmp_path / "hf")
    edit_config(tmp_path / "hf", drop=("rope_parameters",), **{where: {"type": "yarn", "factor": 2.0, "rope_theta": 500.0}})
    assert f"config.json {where}.type='yarn' is not supported" in import_error(tmp_path, capsys)


def test_scaled_rope_nested_by_layer_type_is_refused(tmp_path, capsys):
    save_decoder("llama", tmp_path / "hf")
    edit_config(tmp_path / "hf", layer_types=["full_attention"] * 2,
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}})
    assert "rope_parameters.full_attention.rope_type='linear'" in import_error(tmp_path, capsys)


@pytest.mark.parametrize("edit, named", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.25}},
     "rope_parameters.partial_rotary_factor=0.25"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "factor": 4.0}}, "rope_parameters.factor=4.0"),
    ({"rope_theta": 10000.0}, "rope_theta and rope_parameters.rope_theta=[10000.0, 500.0]"),
])
def test_partial_or_extra_or_conflicting_rope_is_refused(tmp_path, capsys, edit, named):
    save_decoder("llama", tmp_path / "hf")
    edit_config(tmp_path / "hf", **edit)
    assert named in import_error(tmp_path, capsys)


@pytest.mark.parametrize("family, edit, named", [
    ("llama", {"sliding_window": 4}, "sliding_window=4 is unknown to the import of model_type 'llama'"),
    ("llama", {"foo_scale": 2.0}, "foo_scale=2.0 is unknown to the import of model_type 'llama'"),
    ("llama", {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, "quantization_config="),
    ("llama", {"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}, "auto_map="),
    ("qwen2", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types=['sliding_attention']"),
    ("mistral", {"attention_bias": True}, "attention_bias=True is not supported"),
    ("llama", {"is_encoder_decoder": True}, "is_encoder_decoder=True is not supported"),
])
def test_unknown_or_changed_keys_are_refused_by_name(tmp_path, capsys, family, edit, named):
    save_decoder(family, tmp_path / "hf")
    edit_config(tmp_path / "hf", **edit)
    assert named in import_error(tmp_path, capsys)


def test_bert_cross_attention_is_refused(tmp_path, capsys):
    from tests.pretrained.helpers import save_bert

    save_bert(tmp_path / "hf")
    edit_config(tmp_path / "hf", add_cross_attention=True)
    assert "add_cross_attention=True is not supported" in import_error(tmp_path, capsys)


def test_old_style_config_with_only_harmless_extras_imports_exactly(tmp_path):
    """A transformers-4 style config (top-level rope_theta, rope_scaling null, torch_dtype) with keys
    that change nothing in the forward pass imports and computes what transformers computes."""
    save_decoder("llama", tmp_path)
    edit_config(tmp_path, drop=("rope_parameters", "dtype"), rope_theta=500.0, rope_scaling=None, torch_dtype="bfloat16",
                use_cache=False, attention_dropout=0.1, pretraining_tp=1, output_hidden_states=True, num_beams=4,
                max_length=20, _name_or_path="org/tiny", tokenizer_class="LlamaTokenizer", bos_token_id=1,
                id2label={"0": "a", "1": "b"}, attn_implementation="eager", layer_types=["attention", "full_attention"],
                is_llama_config=True, rope_interleaved=False, max_sequence_length=64, tf_legacy_loss=False)
    assert assert_imports_exactly(tmp_path).cfg.rope_base == 500.0


def test_new_style_default_rope_imports_exactly(tmp_path):
    save_decoder("llama", tmp_path)  # rope_parameters {"rope_type": "default", "rope_theta": 500.0}
    assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    assert assert_imports_exactly(tmp_path).cfg.rope_base == 500.0


def test_mixtral_defaults_are_transformers_defaults(tmp_path):
    """Without rope_theta / rms_norm_eps, transformers' Mixtral uses base 1e6 and eps 1e-5 (not 1e4, 1e-6)."""
    save_decoder("mixtral", tmp_path)
    edit_config(tmp_path, drop=("rope_parameters", "rope_theta", "rms_norm_eps"))
    cfg = assert_imports_exactly(tmp_path).cfg
    assert (cfg.rope_base, cfg.norm_eps) == (1e6, 1e-5)


def test_mistral_without_sliding_window_gets_its_default_window(tmp_path):
    """MistralConfig's window is 4096 when config.json has none; it counts once sequences can be longer."""
    save_decoder("mistral", tmp_path, max_position_embeddings=8192)
    edit_config(tmp_path, drop=("sliding_window",))
    cfg = from_hf(tmp_path).cfg
    assert (cfg.attention.kind, cfg.attention.window) == ("local", 4095)


def test_mixtral_num_experts_alias(tmp_path):
    save_decoder("mixtral", tmp_path)
    edit_config(tmp_path, drop=("num_local_experts",), num_experts=4)
    assert assert_imports_exactly(tmp_path).cfg.ffn.num_experts == 4
