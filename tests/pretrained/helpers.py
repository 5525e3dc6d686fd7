"""Tiny random Hugging Face checkpoints, built with ``transformers`` and saved as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="parity tests need transformers (the dev extra)")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.2)  # a wide init: differences show in the logits
DECODERS = {  # family -> (config class, model class, family options); GQA: 4 query heads over 2 kv heads
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}


def randomize_biases(model: torch.nn.Module) -> None:
    """HF initialises biases to zero; random ones make a misplaced bias visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)


def save_decoder(family: str, out: Path, **overrides):
    cfg_cls, model_cls, extra = DECODERS[family]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides}, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    randomize_biases(model)
    model.save_pretrained(out, safe_serialization=True)
    write_word_tokenizer(out, [f"w{i}" for i in range(VOCAB - 3)], {"unk": "<unk>", "bos": "<s>", "eos": "</s>"}, template="<s> $A")
    return model


def save_bert(out: Path, **overrides):
    cfg = transformers.BertConfig(**{**COMMON, "type_vocab_size": 2, **overrides}, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=True).eval()
    randomize_biases(model)
    model.save_pretrained(out, safe_serialization=True)
    write_word_tokenizer(out, [f"w{i}" for i in range(VOCAB - 5)],
                         {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"},
                         template="[CLS] $A [SEP]")
    return model


def write_word_tokenizer(out: Path, words: list[str], specials: dict[str, str], template: str) -> None:
    """A whitespace word-level ``tokenizer.json`` with the specials first, plus ``special_tokens_map.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([*specials.values(), *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    marks = [t for t in template.split() if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in marks])
    tok.add_special_tokens(list(specials.values()))
    tok.save(str(out / "tokenizer.json"))
    (out / "special_tokens_map.json").write_text(json.dumps({f"{k}_token": v for k, v in specials.items()}))
