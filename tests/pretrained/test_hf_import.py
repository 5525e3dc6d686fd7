"""Hugging Face import: parity with transformers per family (fp32, eval), the RoPE layout
permutation, cached generation, the imported tokenizer, the run folder and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from routelab import RoutedTransformer
from routelab.attention.base import RotaryEmbedding
from routelab.errors import ConfigError
from routelab.io import DamagedFileError
from routelab.pretrained import from_hf
from routelab.pretrained.hf import halves_to_pairs
from tests.pretrained.helpers import DECODERS, VOCAB, save_bert, save_decoder, transformers

ATOL = 1e-4


def ids(batch=2, length=16, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_parity(tmp_path, family):
    hf = save_decoder(family, tmp_path)
    model = from_hf(tmp_path)
    x = ids()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        out = model(x)
    assert (out.hidden - ref.hidden_states[-1]).abs().max() < ATOL
    assert (out.logits - ref.logits).abs().max() < ATOL
    assert ref.logits.abs().max() > 0.5  # the numbers compared are not all near zero
    cfg = model.cfg
    assert cfg.n_kv_heads == hf.config.num_key_value_heads < cfg.n_heads
    assert cfg.attn_bias == {"qwen2": "qkv"}.get(family, "none")
    if family == "llama":
        assert cfg.rope_base == 500.0 and cfg.tie_embeddings is False
    if family == "mistral":  # a window of 5 keys (HF: i - j < 5) is routelab's local window 4 (0 <= i - j <= 4)
        assert (cfg.attention.kind, cfg.attention.window) == ("local", 4)
    if family == "mixtral":
        assert cfg.ffn.kind == "moe" and cfg.ffn.router.kind == "topk" and cfg.ffn.router.top_k == 2
        assert cfg.ffn.capacity_factor is None and model.layers[0].ffn.experts.w_in.shape == (4, 32, 48)


def test_mistral_window_is_what_makes_the_difference(tmp_path):
    """The sliding window matters at this length: the same weights with full attention differ."""
    hf = save_decoder("mistral", tmp_path)
    model = from_hf(tmp_path)
    dense = RoutedTransformer(type(model.cfg)(**{**vars(model.cfg), "attention": {"kind": "dense"}}))
    dense.load_state_dict(model.state_dict())
    x = ids()
    with torch.no_grad():
        assert (dense.eval()(x).logits - hf(x).logits).abs().max() > 1e-2


def test_decoder_without_the_rope_permutation_differs(tmp_path, monkeypatch):
    hf = save_decoder("llama", tmp_path)
    monkeypatch.setattr("routelab.pretrained.hf.halves_to_pairs", lambda w, h, d: w)
    model = from_hf(tmp_path)
    x = ids()
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max() > 1e-2


def test_rope_pairs_with_permuted_rows_equal_halves_reference():
    """q/k rows permuted by ``halves_to_pairs`` and rotated in pairs equal the halves (rotate_half)
    rotation of the original rows, channel for channel after the same permutation."""
    H, hd, D, T = 3, 8, 12, 7
    w = torch.randn(H * hd, D)
    x = torch.randn(1, T, D)
    theta = 100.0
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)  # (T, hd) halves layout

    def rotate_half(t):
        return torch.cat([-t[..., hd // 2 :], t[..., : hd // 2]], -1)

    q_hf = (x @ w.t()).view(1, T, H, hd).transpose(1, 2)  # (1, H, T, hd)
    ref = q_hf * cos + rotate_half(q_hf) * sin
    q_ours = (x @ halves_to_pairs(w, H, hd).t()).view(1, T, H, hd).transpose(1, 2)
    ours = RotaryEmbedding(hd, theta, T).rotate(q_ours)
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)
    assert torch.allclose(ours, ref[..., perm], atol=1e-6)
    k = torch.randn(1, H, T, hd)  # and scores are unchanged: q.k is invariant under the permutation
    assert torch.allclose(ours @ (k[..., perm]).transpose(-1, -2), ref @ k.transpose(-1, -2), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_cached_greedy_generation_matches_transformers(tmp_path, family):
    from routelab.generate import SamplingConfig, generate

    hf = save_decoder(family, tmp_path)
    model = from_hf(tmp_path)
    prompt = ids(batch=1, length=5, seed=3)
    with torch.no_grad():
        want = hf.generate(prompt, do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    got = generate(model, prompt, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert got.tolist() == want.tolist()


def test_bert_parity_with_padding_and_token_types(tmp_path):
    hf = save_bert(tmp_path)
    model = from_hf(tmp_path)
    cfg = model.cfg
    assert (cfg.norm_position, cfg.embed_norm, cfg.type_vocab_size, cfg.positions) == ("post", True, 2, "learned")
    x = ids(batch=3, length=12)
    mask = torch.ones_like(x)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    types = (torch.arange(12) >= 6).long().expand(3, -1)
    with torch.no_grad():
        ref = hf(input_ids=x, attention_mask=mask, token_type_ids=types).last_hidden_state
        out = model(x, attention_mask=mask, token_type_ids=types).hidden
    real = mask.bool()
    assert (out - ref)[real].abs().max() < ATOL
    assert ref.abs().max() > 0.5


def test_sharded_checkpoint_and_prefixed_bert(tmp_path):
    """``model.safetensors.index.json`` with several shards; BertFor* nests the encoder under bert."""
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = from_hf(tmp_path)
    x = ids()
    with torch.no_grad():
        ref = hf.bert(x).last_hidden_state
        assert (model(x).hidden - ref).abs().max() < ATOL


# ----------------------------------------------------------------------------------------------
# tokenizer and run folder


def test_imported_tokenizer_specials_and_round_trip(tmp_path):
    from routelab.data import load_tokenizer
    from routelab.pretrained import load_hf_tokenizer

    save_bert(tmp_path / "bert")
    tok = load_hf_tokenizer(tmp_path / "bert")
    assert (tok.pad_id, tok.cls_id, tok.bos_id, tok.eos_id) == (0, 2, 2, 3)  # [PAD] [UNK] [CLS] [SEP] ...
    assert tok.encode("w1 w2") == [6, 7] and tok.encode_with_specials("w1 w2") == [2, 6, 7, 3]
    save_decoder("llama", tmp_path / "llama")
    tok = load_hf_tokenizer(tmp_path / "llama")
    assert (tok.bos_id, tok.eos_id, tok.cls_id, tok.pad_id) == (1, 2, 1, 2)  # no pad token: pad = eos
    tok.save(tmp_path / "saved")
    back = load_tokenizer(tmp_path / "saved")
    assert back.kind == "hf" and back.special_ids == tok.special_ids
    assert back.encode_with_specials("w5 w6") == tok.encode_with_specials("w5 w6") == [1, 8, 9]


def test_import_writes_a_run_folder_that_generate_reads(tmp_path, capsys):
    from routelab.cli import main
    from routelab.train import load_run

    save_decoder("llama", tmp_path / "hf")
    out = tmp_path / "run"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    run = load_run(out)
    assert run.cfg.data.tokenizer == "hf" and run.tokenizer.kind == "hf" and run.cfg.model.n_kv_heads == 2
    ref = from_hf(tmp_path / "hf")
    x = ids()
    with torch.no_grad():
        assert torch.equal(run.model(x).logits, ref(x).logits)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("w1 w2")
    # an existing folder is refused without --force, replaced with it
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(out), "--force"]) == 0


# ----------------------------------------------------------------------------------------------
# bad input: one clear line


def test_unknown_architecture(tmp_path):
    save_decoder("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"unsupported architecture \(model_type='gpt2'.*supports model_type bert, llama, mistral, mixtral, qwen2"):
        from_hf(tmp_path)


def test_unsupported_feature_is_named(tmp_path):
    save_decoder("llama", tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ConfigError, match=r"rope_parameters.rope_type='linear' is not supported.*'default' \(plain RoPE\)"):
        from_hf(tmp_path)


def test_missing_safetensors_file_and_pickles(tmp_path):
    save_decoder("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors nor model.safetensors.index.json"):
        from_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin, a pickle: routelab reads safetensors only"):
        from_hf(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json' not found: .* is not a Hugging Face model folder"):
        from_hf(tmp_path / "empty")


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    save_decoder("llama", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DamagedFileError, match="tensor 'model.layers.1.self_attn.k_proj.weight' is missing"):
        from_hf(tmp_path)


def test_cli_bad_input_exits_2(tmp_path, capsys):
    from routelab.cli import main

    assert main(["import", "hf", str(tmp_path / "absent"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_hub_cache_entry_resolves_to_its_snapshot(tmp_path):
    entry = tmp_path / "models--org--tiny"
    save_decoder("qwen2", entry / "snapshots" / "abc123")
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123")
    assert from_hf(entry).cfg.attn_bias == "qkv"
    from routelab.pretrained.hf import hf_model_type  # upcycle and init_from name such a folder as one

    assert hf_model_type(entry) == "qwen2" and hf_model_type(tmp_path) is None
    from_hf(entry).save_pretrained(tmp_path / "ours")  # routelab's own config.json is not one
    assert hf_model_type(tmp_path / "ours") is None


def test_imported_run_evaluates_on_text_files(tmp_path, capsys):
    """``routelab eval`` reads an imported run like any other: data.tokenizer=hf uses its tokenizer.json."""
    from routelab.cli import main

    save_decoder("llama", tmp_path / "hf")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{j}" for j in torch.randint(0, 60, (80,), generator=g).tolist()))
    out = tmp_path / "run"
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(out)]) == 0
    text = (out / "config.yaml").read_text().replace("source: stdlib", f"source: {corpus}").replace("seq_len: 64", "seq_len: 32")
    (out / "config.yaml").write_text(text)
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] > 0


def test_hf_tokenizer_kind_needs_the_run_folders_file():
    from routelab.config import DataConfig
    from routelab.data import DataError
    from routelab.data.corpus import text_tokenizer

    with pytest.raises(DataError, match="data.tokenizer=hf reads the tokenizer.json of a run folder made by `routelab import hf`"):
        text_tokenizer(DataConfig(tokenizer="hf"), ["text"], None)


def test_bert_run_folder_is_a_classification_run(tmp_path):
    from routelab.pretrained.run_folder import import_hf_run
    from routelab.train import load_run

    save_bert(tmp_path / "hf")
    cfg = import_hf_run(tmp_path / "hf", tmp_path / "run")
    assert (cfg.model.head, cfg.data.task, cfg.data.tokenizer) == ("classification", "classification", "hf")
    run = load_run(tmp_path / "run")
    ref = from_hf(tmp_path / "hf")
    x = ids()
    with torch.no_grad():
        assert torch.equal(run.model(x).hidden, ref(x).hidden)
    assert run.tokenizer.cls_id == 2 and not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left
