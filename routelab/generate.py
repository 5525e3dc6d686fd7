"""Incremental decoding with a KV cache: greedy, temperature, top-k and nucleus (top-p) sampling.

Top-p (nucleus) sampling: Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration",
eq. (2): sample from the smallest set of tokens whose cumulative probability reaches p.
The prompt is run once; each new token then costs one forward pass of a single position over the
cached keys and values (``RoutedTransformer.forward(..., cache=...)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.model import RoutedTransformer
from routelab.precision import autocast

log = logging.getLogger("routelab.generate")


@dataclass
class SamplingConfig:
    """How to pick the next token."""

    max_new_tokens: int = 64  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set with cumulative probability >= p (1 = off)
    stop_tokens: tuple[int, ...] = ()  # generation of a row ends after emitting one of these
    seed: int | None = None  # seeds sampling (None = torch's global RNG)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} is invalid; allowed: >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} is invalid; allowed: >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} is invalid; allowed: >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is invalid; allowed: 0 < top_p <= 1")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / nucleus to -inf. logits: (B, V) -> (B, V)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches p (keeps at least one)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Pick one token per row. logits: (B, V) -> (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: RoutedTransformer, input_ids: Tensor, cfg: SamplingConfig | None = None, precision: str = "fp32") -> Tensor:
    """Continue each prompt row. input_ids: (B, T) -> (B, T + n), n <= cfg.max_new_tokens.

    ``precision``: the forward passes' autocast dtype ('fp32', 'bf16', 'fp16'; ``routelab.precision``);
    the weights stay as they are, the KV cache holds what the projections compute (bf16/fp16 under
    autocast: half the cache memory). Sampling reads float32 logits.

    Rows that emit a stop token are padded afterwards with that stop token; generation ends when all
    rows have stopped, after ``max_new_tokens``, or at ``model.cfg.max_seq_len`` (a warning says so
    when that cuts ``max_new_tokens`` short).
    """
    cfg = cfg or SamplingConfig()
    if model.cfg.head != "lm":
        raise ValueError(f"generate needs an lm head; this model has head={model.cfg.head!r}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token")
    room = model.cfg.max_seq_len - input_ids.shape[1]
    if room < 0:
        raise ValueError(
            f"the prompt has {input_ids.shape[1]} tokens, more than model.max_seq_len={model.cfg.max_seq_len};"
            " shorten it"
        )
    budget = min(cfg.max_new_tokens, room)
    if budget < cfg.max_new_tokens:
        log.warning(
            "generating at most %d of the %d new tokens asked for: the prompt's %d tokens plus them reach"
            " model.max_seq_len=%d (positions and caches are sized for it)",
            budget, cfg.max_new_tokens, input_ids.shape[1], model.cfg.max_seq_len,
        )
    was_training = model.training
    model.eval()
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(cfg.seed)
    try:
        with autocast(input_ids.device, precision):
            return _decode(model, input_ids, cfg, budget, generator)
    finally:
        model.train(was_training)


def _decode(model: RoutedTransformer, input_ids: Tensor, cfg: SamplingConfig, budget: int, generator) -> Tensor:
    """The decoding loop of ``generate``: the prompt once, then one position per step."""
    stop = torch.tensor(cfg.stop_tokens, dtype=torch.long, device=input_ids.device)
    cache = model.new_cache()
    logits = model(input_ids, cache=cache).logits[:, -1].float()  # (B, V)
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    last = None
    for _ in range(budget):
        tok = next_token(logits, cfg, generator)  # (B,)
        if last is not None:
            tok = torch.where(done, last, tok)  # stopped rows repeat their stop token
        out.append(tok[:, None])
        done |= torch.isin(tok, stop)
        last = tok
        if bool(done.all()) or len(out) - 1 == budget:
            break
        logits = model(tok[:, None], cache=cache).logits[:, -1].float()
    return torch.cat(out, dim=1)
