"""``routelab import hf PATH --out DIR --check``: an imported model against ``transformers``' own
implementation of the same checkpoint, on the same token ids: the final hidden states (and the
logits of a causal LM) at every real token, and mean-pooled sentence embeddings (attention-mask
weighted, as sentence-transformers pools) by cosine similarity. ``transformers`` is needed only
here, imported lazily; the import itself never uses it.

A check passes only within tolerance (``require_agreement``): both run the same fp32 arithmetic in
other orders, so a correct import differs by rounding, about 1e-6 of the values' scale; a dropped
feature (scaled RoPE, a window, a bias) shows as 1e-3 and more. A max |diff| may reach ``RTOL`` of
the largest |value| transformers computes (at least 1 is assumed, so values near zero get an absolute
1e-4), the pooled cosine may fall ``COSINE_TOL`` below 1. Past either, the check fails: one line
naming the worst difference and its tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from routelab.device import device_of
from routelab.errors import ConfigError
from routelab.hf_folder import resolve_folder
from routelab.model import RoutedTransformer

RTOL = 1e-4  # a max |diff| allowed, relative to the largest |value| transformers computes (at least 1)
COSINE_TOL = 1e-5  # how far below 1 the smallest mean-pooled cosine similarity may fall
CHECK_TEXTS = (  # prose, code, numbers, non-ASCII and a long line: different lengths, so padding is exercised
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Mixture-of-Experts layers send each token to a few experts.",
    "It rained all day in Zürich; the streets were empty.",
    "The meeting was moved to Thursday at 10:30, room 4B.",
    "Short.",
    "Attention can be dense, local, strided or learned, and routing decides which positions a token sees "
    "and which experts process it.",
    "for i in range(10):\n    print(i * i)",
)


class CheckFailed(ValueError):
    """The imported model differs from transformers' past a tolerance (the CLI's one-line error, exit 2)."""


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """(B, T, D) hidden states, (B, T) mask of real tokens -> (B, D) mean over the real tokens."""
    m = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def padded_batch(tokenizer: Any, texts: tuple[str, ...], max_len: int) -> tuple[Tensor, Tensor]:
    """Each text with the model's own special tokens, right-padded: ids (B, T) and mask (B, T)."""
    rows = [tokenizer.encode_with_specials(t)[:max_len] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def check_against_transformers(path: str | Path, model: RoutedTransformer, tokenizer: Any,
                               texts: tuple[str, ...] = CHECK_TEXTS) -> dict[str, float]:
    """Largest absolute differences (hidden states; logits for causal LMs) over the real tokens of
    ``texts`` and the smallest cosine similarity of their mean-pooled embeddings, routelab's
    ``model`` against transformers' model loaded from ``path`` (fp32, eager attention), with the
    largest absolute values transformers computes (``*_max_abs``: the scale of the tolerances)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("--check compares with transformers' own model, which is not installed; allowed: "
                          "pip install transformers (or the dev extra), or import without --check") from None
    transformers.utils.logging.set_verbosity_error()  # its load reports and progress bar are not ours to show
    transformers.utils.logging.disable_progress_bar()
    folder = resolve_folder(path)
    causal = model.cfg.head == "lm"
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    # fp32 from the file, not the config's dtype: bf16 then .float() would round fp32 weights
    ref = auto.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).float().eval()
    device = device_of(model)  # transformers' model runs beside ours
    ref = ref.to(device)
    ids, mask = (t.to(device) for t in padded_batch(tokenizer, texts, model.cfg.max_seq_len))  # (B, T) each
    model = model.float().eval()
    ours = model(ids, attention_mask=mask)
    theirs = ref(input_ids=ids, attention_mask=mask)
    ref_hidden = ref.base_model(input_ids=ids, attention_mask=mask).last_hidden_state if causal else theirs.last_hidden_state
    real = mask.bool()  # (B, T)
    out = {
        "texts": float(len(texts)),
        "tokens": float(real.sum()),
        "hidden_max_abs_diff": float((ours.hidden - ref_hidden)[real].abs().max()),
        "hidden_max_abs": float(ref_hidden[real].abs().max()),
        "pooled_min_cosine": float(torch.nn.functional.cosine_similarity(
            mean_pool(ours.hidden, mask), mean_pool(ref_hidden, mask), dim=-1).min()),
    }
    if causal:
        out["logits_max_abs_diff"] = float((ours.logits - theirs.logits)[real].abs().max())
        out["logits_max_abs"] = float(theirs.logits[real].abs().max())
    return out


def excesses(result: dict[str, float]) -> list[tuple[float, str]]:
    """Each compared quantity as (its difference / its tolerance, one phrase naming both); a ratio
    above 1 is past the tolerance."""
    found = []
    for name in ("hidden", "logits"):
        if f"{name}_max_abs_diff" in result:
            diff, tol = result[f"{name}_max_abs_diff"], RTOL * max(1.0, result[f"{name}_max_abs"])
            found.append((diff / tol, f"{name} max |diff| {diff:.1e} is past its tolerance {tol:.1e} "
                                      f"({RTOL:g} x the largest |{name}| transformers computes, {result[f'{name}_max_abs']:.3g})"))
    cos = result["pooled_min_cosine"]
    found.append(((1.0 - cos) / COSINE_TOL, f"mean-pooled cosine min {cos:.7f} is below its tolerance {1.0 - COSINE_TOL:.7f}"))
    return found


def require_agreement(result: dict[str, float], out: str | Path) -> None:
    """Raise ``CheckFailed`` naming the worst difference past its tolerance, if any: the per-token
    max |diff| furthest past (relative to its tolerance), else the pooled cosine, a coarser summary
    (``out``: the folder written, which the message says to delete)."""
    *per_token, pooled = excesses(result)
    past = [e for e in per_token if e[0] > 1.0] or [e for e in [pooled] if e[0] > 1.0]
    if past:
        _, what = max(past)
        raise CheckFailed(f"--check failed: {what}; {str(out)!r} was written but does not compute what transformers "
                          f"computes (a config.json setting the import missed, or a wrong conversion): delete it")


def describe(result: dict[str, float]) -> str:
    """One line: ``checked against transformers on 8 texts (93 tokens): hidden max |diff| 1.1e-06, ...``."""
    parts = [f"hidden max |diff| {result['hidden_max_abs_diff']:.1e}"]
    if "logits_max_abs_diff" in result:
        parts.append(f"logits max |diff| {result['logits_max_abs_diff']:.1e}")
    parts.append(f"mean-pooled cosine min {result['pooled_min_cosine']:.7f}")
    return f"checked against transformers on {int(result['texts'])} texts ({int(result['tokens'])} tokens): " + ", ".join(parts)
