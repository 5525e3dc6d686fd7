"""RoutedTransformer behaviour: causality, padding invariance, heads, save/load, errors."""

import json

import pytest
import torch

from routelab import RoutedTransformer
from routelab.attention.base import RotaryEmbedding
from routelab.io import DamagedFileError
from tests.conftest import tiny_config


@pytest.mark.parametrize("positions", ["rope", "learned", "none"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_causal_lm_future_tokens_never_change_past_logits(positions, norm):
    model = RoutedTransformer(tiny_config(positions=positions, norm=norm)).eval()
    x = torch.randint(0, 61, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 61, (2, 8))
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-4  # the future part did change


def test_encoder_is_bidirectional():
    model = RoutedTransformer(tiny_config(head="token_classification", num_labels=3)).eval()
    x = torch.randint(0, 61, (1, 10))
    y = x.clone()
    y[0, 9] = (x[0, 9] + 1) % 61
    assert (model(x).logits[0, 0] - model(y).logits[0, 0]).abs().max() > 1e-5


def test_padding_does_not_change_classification():
    model = RoutedTransformer(tiny_config(head="classification", num_labels=5)).eval()
    x = torch.randint(1, 61, (1, 9))
    padded = torch.cat([x, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 6)], dim=1).long()
    # a batch where the other row is longer, so padding really happens inside the batch
    batch = torch.cat([padded, torch.randint(1, 61, (1, 15))])
    batch_mask = torch.cat([mask, torch.ones(1, 15, dtype=torch.long)])
    alone = model(x).logits
    torch.testing.assert_close(model(padded, attention_mask=mask).logits, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(batch, attention_mask=batch_mask).logits[:1], alone, atol=1e-5, rtol=0)
    # without the mask the padding does leak in: the test above is not vacuous
    assert (model(padded).logits - alone).abs().max() > 1e-5


def test_classification_loss_is_cross_entropy_of_cls_logits():
    model = RoutedTransformer(tiny_config(head="classification", num_labels=4)).eval()
    x, labels = torch.randint(0, 61, (3, 7)), torch.tensor([0, 3, 1])
    out = model(x, labels=labels)
    assert out.logits.shape == (3, 4)
    manual = -out.logits.log_softmax(-1)[torch.arange(3), labels].mean()
    torch.testing.assert_close(out.loss, manual)
    assert float(out.aux_loss) == 0.0 and out.routing == {}


def test_lm_loss_is_shifted_next_token_cross_entropy():
    model = RoutedTransformer(tiny_config()).eval()
    x = torch.randint(0, 61, (2, 6))
    out = model(x, labels=x)
    logp = out.logits[:, :-1].log_softmax(-1)
    manual = -logp.gather(-1, x[:, 1:, None]).mean()
    torch.testing.assert_close(out.loss, manual)


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = tiny_config(ffn={"activation": "swiglu"}, norm="rmsnorm", positions="learned")
    model = RoutedTransformer(cfg).eval()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors"}
    loaded = RoutedTransformer.from_pretrained(tmp_path).eval()
    assert loaded.cfg == cfg
    assert loaded.head.weight is loaded.tok_emb.weight  # tying survives the round trip
    x = torch.randint(0, 61, (2, 11))
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_from_pretrained_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json' not found"):
        RoutedTransformer.from_pretrained(tmp_path / "nothing")


def test_from_pretrained_returns_eval_mode(tmp_path):
    RoutedTransformer(tiny_config(dropout=0.1)).save_pretrained(tmp_path)
    assert not RoutedTransformer.from_pretrained(tmp_path).training


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_from_pretrained_refuses_a_config_that_does_not_match_its_weights(tmp_path):
    RoutedTransformer(tiny_config()).save_pretrained(tmp_path)
    _edit_config(tmp_path, d_model=64)
    with pytest.raises(DamagedFileError, match=r"model.safetensors.*do not match.*config.json.*tok_emb.weight is \(61, 32\)"):
        RoutedTransformer.from_pretrained(tmp_path)


def test_from_pretrained_checks_sizes_before_allocating(tmp_path):
    """A vocabulary of 10^12 rows would need terabytes: it must fail on the header, not in the allocator."""
    RoutedTransformer(tiny_config()).save_pretrained(tmp_path)
    _edit_config(tmp_path, vocab_size=10**12)
    with pytest.raises(DamagedFileError, match=r"tok_emb.weight is \(61, 32\) in the file but \(1000000000000, 32\)"):
        RoutedTransformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
def test_from_pretrained_names_a_damaged_file(tmp_path, damage):
    RoutedTransformer(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    blob = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip":  # a flipped bit in the tensor data: the header still parses, the checksum catches it
        weights.write_bytes(blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:])
    else:
        (tmp_path / "config.json").write_text('{"d_model": 32,')
    name = "config.json" if damage == "json" else "model.safetensors"
    with pytest.raises(DamagedFileError, match=name):
        RoutedTransformer.from_pretrained(tmp_path)


def test_too_long_sequence_and_bad_labels_are_clear_errors():
    model = RoutedTransformer(tiny_config(head="classification", num_labels=3))
    with pytest.raises(ValueError, match=r"sequence length 49 exceeds model.max_seq_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label 3 is out of range; allowed: 0..2"):
        model(torch.zeros(2, 5, dtype=torch.long), labels=torch.tensor([0, 3]))


def test_rope_rotation_preserves_norm_and_encodes_relative_position():
    rope = RotaryEmbedding(8, max_seq_len=4)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    torch.testing.assert_close(rope.rotate(q, 5).norm(), q.norm())  # also extends past max_seq_len
    # <R_m q, R_n k> depends only on m - n
    a = (rope.rotate(q, 3) * rope.rotate(k, 1)).sum()
    b = (rope.rotate(q, 12) * rope.rotate(k, 10)).sum()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_word_vectors_initialise_matching_rows(tmp_path):
    cfg = tiny_config(d_model=4, n_heads=2)
    model = RoutedTransformer(cfg)
    path = tmp_path / "vec.txt"
    path.write_text("2 4\nthe 1 2 3 4\ncat 0.5 0.5 0.5 0.5\n")
    vocab = ["<pad>", "cat", "dog"] + [f"t{i}" for i in range(58)]
    before = model.tok_emb.weight[2].clone()
    assert model.load_word_vectors(path, vocab) == 1
    assert model.tok_emb.weight[1].tolist() == [0.5] * 4
    assert torch.equal(model.tok_emb.weight[2], before)
    path.write_text("cat 1 2 3\n")
    with pytest.raises(ValueError, match="has 3 values; model.d_model=4 requires 4"):
        model.load_word_vectors(path, vocab)


def test_state_dicts_without_the_gate_bias_still_load(tmp_path):
    """Checkpoints written before SwiGLU gates had a bias everywhere (MoE experts, shared experts) load
    with a zero bias: exactly the older model."""
    cfg = tiny_config(ffn={"kind": "moe", "activation": "swiglu", "num_experts": 2, "num_shared_experts": 1})
    model = RoutedTransformer(cfg).eval()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(("experts.b_gate", "w_gate.bias"))}
    assert len(old) < len(model.state_dict())
    loaded = RoutedTransformer(cfg).eval()
    loaded.load_state_dict(old)
    x = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(loaded(x).logits, model(x).logits)  # model's gate biases are zero-initialised
    from routelab.io import save_state_dict

    model.save_pretrained(tmp_path)
    save_state_dict(old, tmp_path / "model.safetensors")
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json.pop("weights_sha256")
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    torch.testing.assert_close(RoutedTransformer.from_pretrained(tmp_path)(x).logits, model(x).logits)
