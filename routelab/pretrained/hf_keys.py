"""Which ``config.json`` keys a Hugging Face import reads, and which it may leave unread.

An import that skips a key which changes the computation (scaled RoPE, a sliding window, a partial
rotary factor, ...) builds a model that runs but computes something else. So every key of a
checkpoint's config falls in one of four classes, per ``model_type`` (``Keys``):

- **mapped**: read by the family's config function, with transformers' default when absent (the
  defaults of transformers' config classes: Mixtral's RoPE base is 1e6 and its RMSNorm eps 1e-5,
  Mistral's window 4096, ...);
- **pinned**: accepted only at the value that leaves the feature off (``is_decoder: false``,
  ``use_sliding_window: false``, ...); any other value is refused, naming key, value and what is
  allowed;
- **inert**: never changes the forward pass of the imported model: names and versions, dtypes (the
  import reads fp32), token ids, output switches, dropout and other training-only settings, the
  generation defaults old transformers stored in config.json (``INERT``, plus per family);
- **unknown**: anything else is refused, naming the key. Its meaning, and so its default, is unknown
  to the import, and transformers writes every field of a config class, defaults included, so a
  key's presence says nothing about whether its value is harmless. Delete the key from config.json
  only if you know it changes nothing.

RoPE is read from every spelling transformers has used: ``rope_scaling`` (before v5; it still wins
when both are given), ``rope_parameters`` (v5; nested by layer type when ``layer_types`` is set),
``type`` / ``rope_type`` inside either, and top-level ``rope_theta`` / ``partial_rotary_factor``.
Only plain RoPE (Su et al. 2021) over the whole head is imported; its base may be given in any of
those places, and must agree where it is given twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routelab.errors import ConfigError


def require(ok: bool, key: str, found: Any, supported: str) -> None:
    """Refuse a checkpoint feature routelab does not import: one line naming it and what is supported."""
    if not ok:
        raise ConfigError(f"config.json {key}={short(found)} is not supported by the import; supported: {supported}")


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a quantization_config can be long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Keys:
    """What the import does with each ``config.json`` key of one ``model_type`` (module docstring)."""

    mapped: dict[str, Any]  # key -> transformers' default, used when the key is absent
    pinned: dict[str, tuple] = field(default_factory=dict)  # key -> the only values accepted (feature off)
    inert: frozenset[str] = frozenset()  # this family's keys that never change the forward pass

    def complete(self, c: dict, model_type: str) -> dict:
        """``c`` checked key by key, with the defaults of the mapped keys it lacks (an unknown key,
        or a pinned one at another value, raises ``ConfigError``, one line)."""
        for key, value in c.items():
            if key in self.mapped or key in self.inert or key in INERT:
                continue
            if key in self.pinned:
                allowed = self.pinned[key]
                require(any(value == a and type(value) is type(a) for a in allowed), key, value,
                        " or ".join(repr(a) for a in allowed) + " (the transformers default; the import has no such feature)")
                continue
            raise ConfigError(
                f"config.json {key}={short(value)} is unknown to the import of model_type {model_type!r}, so what it "
                f"changes is unknown; supported: the keys of routelab.pretrained.hf_keys.KEYS[{model_type!r}] "
                f"(delete it from config.json only if you know it changes nothing)"
            )
        return {**self.mapped, **c}


GENERATION = frozenset({  # sampling defaults older transformers kept in config.json; generation is routelab's own
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size", "encoder_repetition_penalty",
    "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty", "forced_bos_token_id", "forced_eos_token_id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_assistant_tokens",
    "num_assistant_tokens_schedule", "num_beam_groups", "num_beams", "num_return_sequences", "output_scores",
    "remove_invalid_values", "repetition_penalty", "return_dict_in_generate", "suppress_tokens", "target_lookbehind",
    "temperature", "top_k", "top_p", "typical_p",
})
INERT = GENERATION | frozenset({
    # names, versions, provenance; the stored dtype (the import reads every tensor as fp32)
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path", "_commit_hash",
    "dtype", "torch_dtype", "use_bfloat16", "tokenizer_class", "prefix", "finetuning_task", "task_specific_params",
    "problem_type", "id2label", "label2id", "num_labels",
    # token ids: the tokenizer's business (routelab reads them from the tokenizer files)
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # what a transformers forward returns, and how it computes the same function
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "use_return_dict", "torchscript",
    "tie_last_hidden_states", "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
    "_attn_implementation_internal", "experts_implementation", "_experts_implementation", "chunk_size_feed_forward",
    "gradient_checkpointing", "xla_device", "tf_legacy_loss",
})
COMMON_PINNED = {  # encoder-decoder and per-layer features none of the imported families has
    "is_encoder_decoder": (False,), "add_cross_attention": (False,), "tie_encoder_decoder": (False,),
    "cross_attention_hidden_size": (None,), "pruned_heads": ({},), "per_layer_config": (None,),
}

DECODER_MAPPED = {  # LlamaConfig's computation keys and defaults (transformers 5); the RoPE keys are read by rope_base
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
    "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": None, "rope_scaling": None, "rope_theta": None, "partial_rotary_factor": None, "layer_types": None,
}
DECODER_INERT = frozenset({"attention_dropout", "pretraining_tp", "is_decoder"})  # pretraining_tp: the same matmul in slices
NO_BIAS = {"attention_bias": (False,), "mlp_bias": (False,)}  # families whose projections have no bias in transformers

KEYS: dict[str, Keys] = {
    "llama": Keys({**DECODER_MAPPED, "attention_bias": False, "mlp_bias": False},
                  {**COMMON_PINNED, "rope_interleaved": (False,)},  # nanotron's export flag (SmolLM): halves layout
                  DECODER_INERT | {"max_sequence_length", "is_llama_config"}),  # old conversions' and nanotron's notes
    "mistral": Keys({**DECODER_MAPPED, "intermediate_size": 14336, "num_key_value_heads": 8,
                     "max_position_embeddings": 4096 * 32, "sliding_window": 4096}, {**COMMON_PINNED, **NO_BIAS}, DECODER_INERT),
    "qwen2": Keys({**DECODER_MAPPED, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
                   "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
                   "max_window_layers": 28}, {**COMMON_PINNED, **NO_BIAS, "use_mrope": (False,)}, DECODER_INERT),
    "mixtral": Keys({**DECODER_MAPPED, "intermediate_size": 14336, "num_key_value_heads": 8,
                     "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5, "sliding_window": None,
                     "num_local_experts": 8, "num_experts": None, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
                    {**COMMON_PINNED, **NO_BIAS},
                    DECODER_INERT | {"output_router_logits", "router_jitter_noise"}),  # jitter: training only
    "bert": Keys(
        {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
         "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
         "initializer_range": 0.02, "layer_norm_eps": 1e-12, "position_embedding_type": "absolute"},
        {**COMMON_PINNED, "is_decoder": (False,)},
        frozenset({"hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
                   "tie_word_embeddings",  # ties the MLM head, which is not imported
                   "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers", "pooler_size_per_head",
                   "pooler_type", "directionality", "output_past"}),  # the pooler is not imported either
    ),
}
DEFAULT_THETA = {"mixtral": 1e6}  # transformers' RoPE base when a config gives none; 10000 otherwise


# ----------------------------------------------------------------------------------------------
# RoPE and per-layer attention kinds


ROPE_DEFAULT_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")  # all that plain RoPE reads
LEGACY_LAYER_TYPES = {"attention": "full_attention"}  # transformers' older spelling


def layer_types(c: dict) -> list[str] | None:
    """``layer_types`` in transformers' current spelling, or None."""
    types = c.get("layer_types")
    require(types is None or isinstance(types, list), "layer_types", types, "a list of layer kinds, or null")
    return None if types is None else [LEGACY_LAYER_TYPES.get(t, t) for t in types]


def check_layer_types(c: dict, windowed: bool) -> None:
    """Every layer has the attention the import gives all layers (one kind for the whole model)."""
    want = "sliding_attention" if windowed else "full_attention"
    types = layer_types(c)
    if types is not None:
        odd = sorted({t for t in types if t != want})
        require(not odd, "layer_types", odd, f"every entry {want!r} (the import gives every layer the same attention)")


def rope_dicts(c: dict) -> list[tuple[str, dict]]:
    """Every RoPE parameter dict the config gives, with the key path it sits under: ``rope_scaling``
    and ``rope_parameters``, each flat or nested by layer type."""
    types = set(layer_types(c) or ())
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        value = c.get(key)
        if value is None:
            continue
        require(isinstance(value, dict), key, value, "a dict of RoPE parameters, or null")
        if types and value and set(value) <= types:  # nested: {"full_attention": {...}, "sliding_attention": {...}}
            found += [(f"{key}.{t}", p) for t, p in value.items() if p is not None]
        else:
            found.append((key, value))
    return found


def rope_base(c: dict, family: str) -> float:
    """The RoPE base theta, from whichever spelling gives it (module docstring); scaled or partial
    RoPE, and spellings that disagree, are refused."""
    thetas = {"rope_theta": c.get("rope_theta")}
    for where, p in rope_dicts(c):
        require(isinstance(p, dict), where, p, "a dict of RoPE parameters")
        kind = p.get("rope_type", p.get("type", "default"))
        name = f"{where}.{'rope_type' if 'rope_type' in p else 'type'}"
        require(kind == "default", name, kind,
                "'default' (plain RoPE); scaled RoPE (linear, dynamic, yarn, longrope, llama3, ...) is not imported")
        unknown = sorted(set(p) - set(ROPE_DEFAULT_KEYS))
        if unknown:
            require(False, f"{where}.{unknown[0]}", p[unknown[0]], f"plain RoPE, whose only parameters are {', '.join(ROPE_DEFAULT_KEYS)}")
        thetas[f"{where}.rope_theta"] = p.get("rope_theta")
        factor = p.get("partial_rotary_factor")
        require(factor in (None, 1, 1.0), f"{where}.partial_rotary_factor", factor, "1.0 (RoPE over the whole head)")
    factor = c.get("partial_rotary_factor")
    require(factor in (None, 1, 1.0), "partial_rotary_factor", factor, "1.0 (RoPE over the whole head)")
    given = {k: float(v) for k, v in thetas.items() if v is not None}
    require(len(set(given.values())) <= 1, " and ".join(given), list(given.values()),
            "one RoPE base (transformers versions differ in which spelling wins)")
    return next(iter(given.values()), DEFAULT_THETA.get(family, 10000.0))
