"""Import Hugging Face checkpoints as ordinary ``RoutedTransformer`` models (converted, not wrapped).

A local folder only (a ``save_pretrained`` folder or a hub cache snapshot): ``config.json`` plus
``model.safetensors`` or a sharded ``model.safetensors.index.json``, read with ``safetensors``;
``transformers`` is never imported. One function per family builds the ``ModelConfig`` and one maps
the tensor names; ``FAMILIES`` is keyed by the config's ``model_type``:

- BERT-style encoders (``bert``; MiniLM is a BERT): post-norm, learned positions, token types,
  embedding LayerNorm, exact GELU (Devlin et al. 2019).
- Llama-style decoders (``llama``, ``mistral``, ``qwen2``): RMSNorm, RoPE, SwiGLU, grouped-query
  attention; Qwen2's q/k/v biases; Mistral's sliding window as routelab's ``local`` attention.
- Mixtral (``mixtral``; Jiang et al. 2024): the Llama block with a top-2 MoE, imported into
  routelab's MoE layer (``topk`` router, renormalised, dropless).

Every ``config.json`` key is mapped, known to leave the computation alone, or refused, so an import
never runs a checkpoint with a feature it silently dropped (``routelab.pretrained.hf_keys``).

RoPE layouts: Hugging Face rotates channel i with channel i + hd/2 ("halves", ``rotate_half``);
routelab rotates pairs (2i, 2i+1) (RoFormer eq. 34). Both rotate by the same angle m * theta_i, so
reordering the rows of each head of ``q_proj``/``k_proj`` (``halves_to_pairs``) makes routelab's
rotation compute Hugging Face's, and q.k is unchanged by the same reordering of q and k.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from routelab.config import ModelConfig, model_config_from_dict
from routelab.errors import ConfigError
from routelab.hf_folder import CONFIG_FILE, hf_model_type, read_config, resolve_folder  # noqa: F401  (CONFIG_FILE, hf_model_type: re-exported)
from routelab.model import RoutedTransformer
from routelab.pretrained.checkpoint import INDEX_FILE, WEIGHTS_FILE, Source, Tensors  # noqa: F401  (INDEX_FILE, WEIGHTS_FILE: re-exported)
from routelab.pretrained.fill import empty_model, fill
from routelab.pretrained.hf_keys import KEYS, check_layer_types, require, rope_base

log = logging.getLogger("routelab.pretrained")

# ----------------------------------------------------------------------------------------------
# helpers shared by the families


def halves_to_pairs(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """Reorder the rows of each head of a q/k projection weight (H*hd, D) or bias (H*hd,) from the
    halves RoPE layout to routelab's pairs: routelab channel 2i = HF channel i, 2i+1 = HF i + hd/2."""
    perm = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)  # [0, hd/2, 1, hd/2 + 1, ...]
    return w.reshape(n_heads, head_dim, *w.shape[1:])[:, perm].reshape(w.shape)


def head_dim_of(c: dict, d: int, n_heads: int) -> int:
    require(d % n_heads == 0, "hidden_size", d, f"a multiple of num_attention_heads={n_heads}")
    hd = c.get("head_dim") or d // n_heads
    require(hd * n_heads == d, "head_dim", hd, f"hidden_size / num_attention_heads = {d // n_heads} (routelab's heads split d_model)")
    return hd


# ----------------------------------------------------------------------------------------------
# BERT-style encoders


BERT_ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}  # transformers' name -> routelab's (gelu: exact, erf)


def bert_config(c: dict) -> ModelConfig:
    act = c["hidden_act"]
    require(act in BERT_ACTIVATIONS, "hidden_act", act, "'gelu' (exact, erf) or 'relu'")
    pos = c["position_embedding_type"]
    require(pos == "absolute", "position_embedding_type", pos, "'absolute'")
    d, H = c["hidden_size"], c["num_attention_heads"]
    head_dim_of(c, d, H)
    labels = len(c["id2label"]) if isinstance(c.get("id2label"), dict) else c.get("num_labels", 2)
    return model_config_from_dict({
        "vocab_size": c["vocab_size"], "d_model": d, "n_layers": c["num_hidden_layers"], "n_heads": H,
        "max_seq_len": c["max_position_embeddings"], "norm": "layernorm", "norm_eps": c["layer_norm_eps"],
        "norm_position": "post", "embed_norm": True, "positions": "learned", "type_vocab_size": c["type_vocab_size"],
        "head": "classification", "num_labels": max(2, int(labels)), "causal": False, "tie_embeddings": False,
        "init_std": c["initializer_range"], "attn_bias": "all",
        "ffn": {"kind": "dense", "hidden": c["intermediate_size"], "activation": BERT_ACTIVATIONS[act], "bias": True},
    })


def bert_weights(c: dict, cfg: ModelConfig, t: Tensors) -> dict[str, Source]:
    p = "bert." if "bert.embeddings.word_embeddings.weight" in t else ""  # BertFor* checkpoints nest the encoder

    def norm(name: str) -> tuple[Source, Source]:  # old checkpoints call the LayerNorm parameters gamma/beta
        if f"{name}.weight" not in t and f"{name}.gamma" in t:
            return t.source(f"{name}.gamma"), t.source(f"{name}.beta")
        return t.source(f"{name}.weight"), t.source(f"{name}.bias")

    e = f"{p}embeddings"
    s = {
        "tok_emb.weight": t.source(f"{e}.word_embeddings.weight"),
        "pos_emb.weight": t.source(f"{e}.position_embeddings.weight"),
        "type_emb.weight": t.source(f"{e}.token_type_embeddings.weight"),
    }
    s["embed_norm.weight"], s["embed_norm.bias"] = norm(f"{e}.LayerNorm")
    for i in range(cfg.n_layers):
        h, o = f"{p}encoder.layer.{i}", f"layers.{i}"
        for ours, theirs in (("q_proj", "attention.self.query"), ("k_proj", "attention.self.key"),
                             ("v_proj", "attention.self.value"), ("o_proj", "attention.output.dense")):
            s[f"{o}.attn.{ours}.weight"] = t.source(f"{h}.{theirs}.weight")
            s[f"{o}.attn.{ours}.bias"] = t.source(f"{h}.{theirs}.bias")
        s[f"{o}.attn_norm.weight"], s[f"{o}.attn_norm.bias"] = norm(f"{h}.attention.output.LayerNorm")
        for ours, theirs in (("w_in", "intermediate.dense"), ("w_out", "output.dense")):
            s[f"{o}.ffn.{ours}.weight"] = t.source(f"{h}.{theirs}.weight")
            s[f"{o}.ffn.{ours}.bias"] = t.source(f"{h}.{theirs}.bias")
        s[f"{o}.ffn_norm.weight"], s[f"{o}.ffn_norm.bias"] = norm(f"{h}.output.LayerNorm")
    return s  # the classification head is new (the pooler and task heads are not imported)


# ----------------------------------------------------------------------------------------------
# Llama-style decoders and Mixtral


def sliding_window(c: dict, family: str) -> int | None:
    """The attention window a decoder uses, or None for full causal attention. Llama has none (a
    ``sliding_window`` key is unknown there); Qwen2's is off unless ``use_sliding_window``."""
    if family == "qwen2":
        use = c["use_sliding_window"]
        require(not use, "use_sliding_window", use, "false (Qwen2's per-layer windows are not imported)")
        return None
    w = c.get("sliding_window")
    return w if w is not None and w < c["max_position_embeddings"] else None


def num_experts(c: dict) -> int:
    """Mixtral's expert count: ``num_local_experts``, unless its alias ``num_experts`` is given (then
    that, as in transformers, which sets the alias after the field)."""
    return c["num_experts"] if c["num_experts"] is not None else c["num_local_experts"]


def decoder_config(c: dict, family: str) -> ModelConfig:
    """A Llama-style decoder; ``c`` is checked and completed by ``KEYS[family]``."""
    require(c["hidden_act"] in ("silu", "swish"), "hidden_act", c["hidden_act"], "'silu' (SwiGLU)")
    d, H = c["hidden_size"], c["num_attention_heads"]
    head_dim_of(c, d, H)
    n_kv = c["num_key_value_heads"] or H
    if family == "qwen2":
        attn_bias = "qkv"  # Qwen2: biases on q, k, v; none on o
    else:
        attn_bias = "all" if c.get("attention_bias", False) else "none"
    ffn: dict[str, Any] = {"kind": "dense", "hidden": c["intermediate_size"], "activation": "swiglu", "bias": bool(c.get("mlp_bias", False))}
    if family == "mixtral":
        ffn = {
            "kind": "moe", "num_experts": num_experts(c), "hidden": c["intermediate_size"],
            "activation": "swiglu", "bias": False, "capacity_factor": None,
            "router": {"kind": "topk", "top_k": c["num_experts_per_tok"], "renormalize": True},
            "balance_loss_weight": float(c["router_aux_loss_coef"]), "z_loss_weight": 0.0,
        }
    window = sliding_window(c, family)
    check_layer_types(c, windowed=window is not None)
    # HF's window W lets query i see keys i-W+1 .. i (W keys); routelab's local window w sees i-w .. i
    attention = {"kind": "local", "window": window - 1} if window is not None else {"kind": "dense"}
    if window is not None:
        require(window >= 2, "sliding_window", window, "an integer >= 2 (or null)")
    return model_config_from_dict({
        "vocab_size": c["vocab_size"], "d_model": d, "n_layers": c["num_hidden_layers"], "n_heads": H,
        "n_kv_heads": n_kv if n_kv != H else None, "attn_bias": attn_bias, "max_seq_len": c["max_position_embeddings"],
        "norm": "rmsnorm", "norm_eps": c["rms_norm_eps"], "norm_position": "pre", "positions": "rope",
        "rope_base": rope_base(c, family), "head": "lm", "causal": True, "tie_embeddings": bool(c["tie_word_embeddings"]),
        "init_std": c["initializer_range"], "attention": attention, "ffn": ffn,
    })


def decoder_weights(c: dict, cfg: ModelConfig, t: Tensors) -> dict[str, Source]:
    H, Hkv, hd = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    s = {"tok_emb.weight": t.source("model.embed_tokens.weight"), "norm.weight": t.source("model.norm.weight")}
    if not cfg.tie_embeddings:
        s["head.weight"] = t.source("lm_head.weight")
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}", f"layers.{i}"
        s[f"{o}.attn_norm.weight"] = t.source(f"{h}.input_layernorm.weight")
        s[f"{o}.ffn_norm.weight"] = t.source(f"{h}.post_attention_layernorm.weight")
        for name, heads in (("q_proj", H), ("k_proj", Hkv), ("v_proj", None), ("o_proj", None)):
            for kind in ("weight", "bias"):
                if kind == "bias" and (cfg.attn_bias == "none" or (name == "o_proj" and cfg.attn_bias == "qkv")):
                    continue
                reorder = (lambda w, n=heads: halves_to_pairs(w, n, hd)) if heads else None
                s[f"{o}.attn.{name}.{kind}"] = t.source(f"{h}.self_attn.{name}.{kind}", reorder)
        if cfg.ffn.kind == "moe":
            m = f"{h}.block_sparse_moe"
            s[f"{o}.ffn.router.weight"] = t.source(f"{m}.gate.weight")  # (E, D)
            E = cfg.ffn.num_experts
            for ours, theirs in (("w_gate", "w1"), ("w_in", "w3"), ("w_out", "w2")):  # Linear (out, in) -> (in, out)
                s[f"{o}.ffn.experts.{ours}"] = t.stacked([f"{m}.experts.{e}.{theirs}.weight" for e in range(E)], Tensor.t)
        else:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_in", "up_proj"), ("w_out", "down_proj")):
                s[f"{o}.ffn.{ours}.weight"] = t.source(f"{h}.mlp.{theirs}.weight")
                if cfg.ffn.bias:
                    s[f"{o}.ffn.{ours}.bias"] = t.source(f"{h}.mlp.{theirs}.bias")
    return s


# ----------------------------------------------------------------------------------------------
# the registry and the entry point


@dataclass(frozen=True)
class Family:
    """How one ``model_type`` is imported: its ``ModelConfig`` (from a config checked and completed
    by ``KEYS``) and where each of the model's tensors comes from in the checkpoint (read lazily)."""

    config: Callable[[dict], ModelConfig]
    weights: Callable[[dict, ModelConfig, Tensors], dict[str, Source]]


FAMILIES: dict[str, Family] = {
    "bert": Family(bert_config, bert_weights),
    "llama": Family(lambda c: decoder_config(c, "llama"), decoder_weights),
    "mistral": Family(lambda c: decoder_config(c, "mistral"), decoder_weights),
    "qwen2": Family(lambda c: decoder_config(c, "qwen2"), decoder_weights),
    "mixtral": Family(lambda c: decoder_config(c, "mixtral"), decoder_weights),
}


def family_of(c: dict) -> str:
    model_type = c.get("model_type")
    if model_type in FAMILIES:
        return model_type
    found = f"model_type={model_type!r}" + (f", architectures={c['architectures']}" if c.get("architectures") else "")
    raise ConfigError(f"unsupported architecture ({found}); the import supports model_type {', '.join(sorted(FAMILIES))}")


def checked_config(c: dict) -> tuple[Family, dict]:
    """The family of ``config.json`` ``c`` and ``c`` checked key by key and completed with
    transformers' defaults (``hf_keys.Keys.complete``)."""
    model_type = family_of(c)
    return FAMILIES[model_type], KEYS[model_type].complete(c, model_type)


def hf_model_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` an import of ``path`` builds (nothing else is read)."""
    family, c = checked_config(read_config(resolve_folder(path)))
    return family.config(c)


def read_hf(path: str | Path) -> tuple[ModelConfig, dict[str, Source], Path]:
    """The ``ModelConfig`` the Hugging Face folder ``path`` becomes, the ``Source`` of each of the
    model's tensors (nothing read yet, but every one checked to be there) and the folder read.

    Raises ``ConfigError`` (an architecture or feature not imported), ``FileNotFoundError`` (no
    config.json or safetensors weights) or ``DamagedFileError`` (a tensor missing), each one line
    naming what was found and what is supported."""
    folder = resolve_folder(path)
    family, c = checked_config(read_config(folder))
    cfg = family.config(c)
    tensors = Tensors.open(folder)
    sources = family.weights(c, cfg, tensors)
    referenced = {name for source in sources.values() for name in source.names}
    skipped = [n for n in sorted(set(tensors.files) - referenced) if not n.endswith(("position_ids", "rotary_emb.inv_freq"))]
    if skipped:
        log.info("checkpoint tensors not imported: %s", ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
    return cfg, sources, folder


def convert_hf(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], Path]:
    """Read the Hugging Face model folder ``path``: the ``ModelConfig`` it becomes, its tensors under
    routelab's names (fp32, all in memory at once) and the folder read; errors as ``read_hf``.
    ``from_hf`` does not use it: it copies one tensor at a time into the model."""
    cfg, sources, folder = read_hf(path)
    return cfg, {name: source.read().to(torch.float32) for name, source in sources.items()}, folder


def from_hf(path: str | Path) -> RoutedTransformer:
    """Import a Hugging Face model folder (BERT, Llama, Mistral, Qwen2, Mixtral; safetensors),
    converted into a ``RoutedTransformer`` in eval mode (see the module docstring). The model is
    built without parameter memory and filled tensor by tensor (``routelab.pretrained.fill``), so
    the import's peak memory is about the float32 model plus one checkpoint tensor; the parameters
    the checkpoint lacks (BERT's classification head) are initialised as in a new model."""
    cfg, sources, folder = read_hf(path)
    return fill(empty_model(cfg), sources).eval()


def load_hf_tokenizer(path: str | Path) -> Any:
    """The folder's tokenizer as a routelab ``HFTokenizer`` (needs the ``tokenizers`` package)."""
    from routelab.data.tokenizers import HFTokenizer

    folder = resolve_folder(path)
    return HFTokenizer.from_folder(folder, read_config(folder))
