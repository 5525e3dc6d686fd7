"""Config validation: unknown keys, wrong types, ranges, overrides, YAML round trip."""

import pytest

from routelab.config import Config, ConfigError, ModelConfig, apply_overrides


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = Config.from_dict({"model": {"d_model": 64, "ffn": {"activation": "swiglu"}}, "train": {"lr": 3e-4}})
    cfg.save(tmp_path / "c.yaml")
    again = Config.load(tmp_path / "c.yaml")
    assert again == cfg
    assert again.model.ffn.activation == "swiglu"
    assert again.model.causal is True  # derived from head=lm


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown key 'model.d_modle'.*did you mean 'd_model'"):
        Config.from_dict({"model": {"d_modle": 64}})


def test_unknown_section_key_nested():
    with pytest.raises(ConfigError, match=r"model.ffn.activaton.*did you mean 'activation'"):
        Config.from_dict({"model": {"ffn": {"activaton": "relu"}}})


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"model": {"d_model": "big"}}, r"model.d_model='big' is invalid; allowed: an integer"),
        ({"model": {"d_model": 1.5}}, r"model.d_model=1.5 is invalid; allowed: an integer"),
        ({"train": {"progress": "yes"}}, r"train.progress='yes' is invalid; allowed: true or false"),
        ({"model": {"norm": "batchnorm"}}, r"model.norm='batchnorm' is invalid.*'layernorm', 'rmsnorm'"),
        ({"model": {"d_model": 0}}, r"model.d_model=0 is invalid; allowed: a number > 0"),
        ({"model": {"d_model": 30, "n_heads": 4}}, r"model.d_model=30 .*multiple of model.n_heads=4"),
        ({"train": {"lr": -1}}, r"train.lr=-1.0 is invalid"),
        ({"model": {"dropout": 1.0}}, r"model.dropout=1.0 is invalid; allowed: 0 <= value < 1"),
        ({"model": {"attention": {"kind": "densee"}}}, r"unknown attention kind 'densee'.*did you mean 'dense'.*known kinds: .*dense"),
        ({"model": {"head": "classification"}}, r"data.task='lm' is invalid.*'classification'"),
        ({"data": {"seq_len": 1000}}, r"data.seq_len=1000 is invalid; allowed: <= model.max_seq_len=256"),
        ({"model": {"head": "lm", "causal": False}}, r"model.causal=False is invalid"),
    ],
)
def test_bad_values_name_field_value_and_allowed(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        Config.from_dict(data)


def test_int_is_accepted_for_float_fields():
    cfg = Config.from_dict({"train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_overrides_parse_yaml_scalars_and_nest():
    data = apply_overrides({"model": {"d_model": 64}}, ["model.d_model=256", "train.progress=false", "model.ffn.kind=dense"])
    assert data == {"model": {"d_model": 256, "ffn": {"kind": "dense"}}, "train": {"progress": False}}
    assert apply_overrides({}, ["train.lr=1e-3", "train.steps=10", "data.source=e.txt"]) == {
        "train": {"lr": 1e-3, "steps": 10}, "data": {"source": "e.txt"}
    }  # YAML 1.1 alone would read 1e-3 as a string
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["model.d_model"])


def test_load_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' line 2, column 1: expected ',' or '\]'"):
        Config.load(bad)


def test_swiglu_hidden_keeps_parameter_count_close_to_gelu():
    gelu = ModelConfig(d_model=96)
    swiglu = ModelConfig(d_model=96, ffn={"activation": "swiglu"})
    assert gelu.ffn_hidden == 384
    assert swiglu.ffn_hidden % 8 == 0
    assert abs(3 * swiglu.ffn_hidden - 2 * gelu.ffn_hidden) <= 3 * 8


def test_base_config_is_merged_under_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("model: {d_model: 64, n_heads: 4, ffn: {kind: dense, activation: swiglu}}\ntrain: {lr: 0.01}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nmodel: {n_layers: 3, ffn: {hidden: 32}}\n")
    cfg = Config.load(tmp_path / "child.yaml", ["train.steps=5"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.lr, cfg.train.steps) == (64, 3, 0.01, 5)
    assert cfg.model.ffn.activation == "swiglu" and cfg.model.ffn.hidden == 32
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        Config.load(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="base 'missing.yaml' not found"):
        Config.load(tmp_path / "orphan.yaml")


def test_a_renamed_attention_kind_still_loads():
    """``topp`` was renamed ``block_topp`` (the MoE router keeps ``topp``): saved configs still load."""
    cfg = ModelConfig(vocab_size=11, attention={"kind": "topp", "block_size": 8})
    assert cfg.attention.kind == "block_topp" and cfg.attention.block_size == 8


@pytest.mark.parametrize(
    "train, pattern",
    [
        ({"data_parallel": "zero3"}, r"train.data_parallel='zero3' is invalid; allowed: .*'ddp', 'fsdp'"),
        ({"data_parallel": "fsdp", "expert_parallel": 2},
         r"^train.data_parallel='fsdp' is invalid; allowed: 'ddp' with train.expert_parallel > 1 \(fsdp does not compose"),
        ({"data_parallel": "fsdp", "distill": {"teacher": "runs/t"}}, r"^train.data_parallel='fsdp' is invalid; allowed: 'ddp' with train.distill.teacher"),
    ],
)
def test_data_parallel_modes_and_what_fsdp_does_not_compose_with_yet(train, pattern):
    assert Config.from_dict({}).train.data_parallel == "ddp"
    assert Config.from_dict({"train": {"data_parallel": "fsdp"}}).train.data_parallel == "fsdp"
    with pytest.raises(ConfigError, match=pattern):
        Config.from_dict({"train": train})
