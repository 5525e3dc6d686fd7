"""Upcycling: a trained model's weights mapped onto a model of another routing config.

- Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from
  Dense Checkpoints", ICLR 2023): each dense FFN becomes an MoE layer whose E experts start as copies
  of it, E_i = FFN for all i, with a freshly initialised router. The layer computes
  y = sum_k g_k(x) FFN(x) = (sum_k g_k(x)) FFN(x), which is the dense FFN wherever the gates of a
  token sum to 1. Optional Gaussian noise on the copies breaks their symmetry. At step 0, per router:

    exactly the dense FFN   topk (renormalize: true), hash, random (train; eval_mode mean or seeded),
                            gshard in eval, topp (renormalize: true)
    g(x) * FFN(x), g < 1    switch (g = the top-1 probability, about 1/E from a fresh router),
                            topk / topp with raw probabilities (g = the chosen experts' probability
                            mass), gshard in training (g = g1 when the second expert is skipped),
                            base (g = sigmoid of the chosen logit, about 1/2), expert_choice (g = the
                            probabilities of the experts that chose the token; 0 if none did)
    another function        soft (each expert sees a mix of tokens: FFN(sum_t D_t x_t) != sum FFN)
    and with a capacity factor, a dropped token gets 0 from the routed experts.
- Attention conversion (Beltagy et al. 2020, "Longformer", sec. 5): a dense attention layer becomes
  a sparse kind keeping its q/k/v/o projections, and a learned position table is extended to a longer
  ``max_seq_len`` by copying it repeatedly. RoPE needs nothing: it is a function of the position.

``upcycle(source, target_cfg)`` builds the target model and fills it; ``upcycle_into`` fills a model
already built (the trainer's). Every target tensor is, in this order: copied (same name and shape),
made from a dense FFN (stacked experts and shared experts), extended (the learned position table),
or left as initialised ("fresh": routers, kind-specific attention parameters). What cannot map (a
different width, depth, vocabulary, head, norm; an MoE back to dense) raises one ``ConfigError``
naming the difference.

Shared experts (``num_shared_experts`` S > 0) also start as copies of the dense FFN. Then S + 1
copies of FFN(x) are summed (the routed mixture and S shared ones), so the output projections
``w_out`` / ``b_out`` of the routed experts and of each shared copy are scaled by 1 / (S + 1): the
layer still equals the dense FFN where the gates sum to 1.

A transform on built models, above ``routelab.model`` and below ``routelab.train`` (``train.init_from``
starts runs from it) and ``routelab.pretrained`` (which re-exports it as ``pretrained.upcycle``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from routelab.config import ModelConfig, to_dict
from routelab.device import device_of
from routelab.errors import ConfigError
from routelab.model import RoutedTransformer
from routelab.moe.sliced_init import normal_rows

__all__ = ["Conversion", "check_convertible", "config_changes", "fill_from_source", "upcycle", "upcycle_into", "upcycle_with_conversion"]

# model fields that may differ between the source and the target: the routed sections (checked
# apart), the length, and what only training or initialisation reads. Any other field (and any field
# added later) must be equal, so a new option that changes the function is refused, not ignored.
FREE_FIELDS = ("attention", "ffn", "max_seq_len", "rope_base", "dropout", "init_std", "embeddings_path", "freeze_embeddings")
SAME_ATTENTION = ("combine",)  # attention options that own parameters shared by every kind
SAME_FFN = ("activation", "bias")  # an expert is a copy of the dense FFN: same activation and biases
WHAT_MAY_CHANGE = (
    "model.ffn (dense -> moe, expert width = the dense width), model.attention (kind and options),"
    " model.max_seq_len, model.rope_base, model.dropout, model.init_std"
)

# a stacked expert tensor -> (its dense FFN tensor, transposed?): nn.Linear holds (out, in), experts (in, out)
EXPERT_FROM_DENSE = {
    "w_in": ("w_in.weight", True),
    "w_gate": ("w_gate.weight", True),
    "w_out": ("w_out.weight", True),
    "b_in": ("w_in.bias", False),
    "b_gate": ("w_gate.bias", False),
    "b_out": ("w_out.bias", False),
}
EXPERT_KEY = re.compile(r"^(layers\.\d+\.ffn\.)experts\.(\w+)$")
SHARED_KEY = re.compile(r"^(layers\.\d+\.ffn\.)shared\.(w_in|w_gate|w_out)\.(weight|bias)$")


@dataclass
class Conversion:
    """What ``upcycle_into`` did with each tensor (target names, except ``dropped``)."""

    copied: list[str] = field(default_factory=list)  # same name and shape in the source
    from_dense: list[str] = field(default_factory=list)  # experts and shared experts made from a dense FFN
    extended: list[str] = field(default_factory=list)  # the learned position table, tiled or cut
    fresh: list[str] = field(default_factory=list)  # kept as initialised (routers, new attention parameters)
    dropped: list[str] = field(default_factory=list)  # source tensors the target has no place for
    changes: list[str] = field(default_factory=list)  # ``model.key (a -> b)`` config differences

    @property
    def plain_load(self) -> bool:
        """Whether the target is the source's model: the same config, every tensor copied as it was."""
        return not (self.from_dense or self.extended or self.fresh or self.dropped or self.changes)

    @property
    def moe_layers(self) -> int:
        return len({k.split(".ffn.")[0] for k in self.from_dense})

    def describe(self) -> str:
        """One line: ``model.ffn.kind (dense -> moe): 2 dense FFNs -> experts, 28 tensors copied, 2 fresh (...)``."""
        parts = []
        if self.moe_layers:
            parts.append(f"{self.moe_layers} dense FFN(s) -> MoE experts")
        parts.append(f"{len(self.copied)} tensors copied")
        if self.extended:
            parts.append(f"positions extended ({', '.join(self.extended)})")
        if self.fresh:
            parts.append(f"{len(self.fresh)} fresh ({_some(self.fresh)})")
        if self.dropped:
            parts.append(f"{len(self.dropped)} source tensors dropped ({_some(self.dropped)})")
        head = f"{', '.join(self.changes[:4])}{' ...' if len(self.changes) > 4 else ''}: " if self.changes else ""
        return head + ", ".join(parts)


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


# ----------------------------------------------------------------------------------------------
# what may change


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(source: ModelConfig, target: ModelConfig) -> list[str]:
    """``model.ffn.kind ('dense' -> 'moe')`` for every kind that changes and every other value both
    configs have that differs (the options a new kind brings are not listed)."""
    a, b = _flat(to_dict(source), "model."), _flat(to_dict(target), "model.")
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and (k.endswith(".kind") or (k in a and k in b)))
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in sorted(keys, key=lambda k: not k.endswith(".kind"))]


def fill_from_source(target: ModelConfig, source: ModelConfig) -> ModelConfig:
    """``target`` with ``vocab_size`` / ``num_labels`` taken from ``source`` where they are None."""
    fill = {n: getattr(source, n) for n in ("vocab_size", "num_labels") if getattr(target, n) is None}
    return dataclasses.replace(target, **fill) if fill else target


def check_convertible(source: ModelConfig, target: ModelConfig) -> None:
    """Raise one ``ConfigError`` naming the first difference that weights cannot cross.

    Every model field must be equal except ``FREE_FIELDS``; the attention ``combine`` must be equal;
    the FFN kind may stay or go dense -> moe, with the experts as wide as the dense FFN and the same
    activation and biases. (An MoE source with a different expert count fails on the tensor shapes.)
    """
    def refuse(what: str) -> None:
        raise ConfigError(f"cannot map the weights onto the target model: {what}; what may change: {WHAT_MAY_CHANGE}")

    for f in dataclasses.fields(ModelConfig):
        if f.name not in FREE_FIELDS and getattr(source, f.name) != getattr(target, f.name):
            refuse(f"model.{f.name} is {getattr(source, f.name)!r} in the source but {getattr(target, f.name)!r} in the target")
    for name in SAME_ATTENTION:
        a, b = getattr(source.attention, name, None), getattr(target.attention, name, None)
        if a != b:
            refuse(f"model.attention.{name} is {a!r} in the source but {b!r} in the target")
    sk, tk = source.ffn.kind, target.ffn.kind
    if sk != tk and (sk, tk) != ("dense", "moe"):
        refuse(f"model.ffn.kind {sk!r} -> {tk!r} (only dense -> moe, or the same kind)")
    for name in SAME_FFN:
        a, b = getattr(source.ffn, name), getattr(target.ffn, name)
        if a != b:
            refuse(f"model.ffn.{name} is {a!r} in the source but {b!r} in the target")
    if source.ffn_hidden != target.ffn_hidden:
        refuse(
            f"the FFN width is {source.ffn_hidden} in the source but {target.ffn_hidden} in the target"
            f" (experts start as copies of the dense FFN: set model.ffn.hidden={source.ffn_hidden} or null)"
        )


# ----------------------------------------------------------------------------------------------
# the mapping


@torch.no_grad()
def upcycle_into(
    target: RoutedTransformer,
    source_cfg: ModelConfig,
    source_state: dict[str, Tensor],
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Conversion:
    """Fill ``target`` (built from its own config, so its fresh tensors are initialised) from the
    state dict of a ``RoutedTransformer(source_cfg)``; see the module docstring. ``noise``: std of
    the Gaussian noise added to the weight matrices of every expert made from a dense FFN (drawn
    from ``generator``, on the CPU). Returns what was done with each tensor.

    A target holding a slice of its experts (``expert_slice``: expert parallelism) gets exactly its
    rows of what the whole target would get (its experts' noise included: the whole draw, rows kept)."""
    check_convertible(source_cfg, target.cfg)
    if noise < 0:
        raise ConfigError(f"noise={noise!r} is invalid; allowed: a number >= 0 (the std of the noise on expert copies)")
    state = target.state_dict()
    rows = target.expert_rows()  # name -> (lo, hi, total) of a sliced target's expert tensors
    done = Conversion(changes=config_changes(source_cfg, target.cfg))
    used: set[str] = set()
    shared = getattr(target.cfg.ffn, "num_shared_experts", 0)
    split = 1.0 / (shared + 1)  # the dense output, shared between the routed mixture and each shared copy
    new: dict[str, Tensor] = {}
    for name, t in state.items():
        src = source_state.get(name)
        if src is not None and name in rows and tuple(src.shape) == (rows[name][2], *t.shape[1:]):
            src = src[rows[name][0] : rows[name][1]]  # the target's rows of the source's experts
        if src is not None and src.shape == t.shape:
            new[name] = src
            used.add(name)
            done.copied.append(name)
            continue
        made = _from_dense(name, t, source_state, shared, split, noise, generator, rows.get(name))
        if made is not None:
            new[name], dense_names = made
            used.update(dense_names)
            done.from_dense.append(name)
        elif name == "pos_emb.weight" and src is not None and src.shape[1:] == t.shape[1:]:
            reps = -(-t.shape[0] // src.shape[0])  # Longformer: the table copied repeatedly, then cut
            new[name] = src.repeat(reps, 1)[: t.shape[0]]
            used.add(name)
            done.extended.append(f"{src.shape[0]} -> {t.shape[0]}")
        elif src is not None:
            raise ConfigError(
                f"cannot map the weights onto the target model: {name} is {tuple(src.shape)} in the source but"
                f" {tuple(t.shape)} in the target (a size the config changes; what may change: {WHAT_MAY_CHANGE})"
            )
        else:
            _refuse_moe_to_dense(name, source_state)
            new[name] = t
            done.fresh.append(name)
    done.dropped = sorted(k for k in source_state if k not in used)
    target.load_state_dict({k: v.to(device=state[k].device, dtype=state[k].dtype) for k, v in new.items()})
    return done


def _from_dense(
    name: str, t: Tensor, source: dict[str, Tensor], shared: int, split: float, noise: float, gen: torch.Generator | None,
    span: tuple[int, int, int] | None = None,
) -> tuple[Tensor, list[str]] | None:
    """Target tensor ``name`` (stacked experts (E, ...) or the shared experts' FFN) made from the dense
    FFN of the same layer in ``source``, with the dense names used; None if it is not such a tensor.
    ``span`` (lo, hi, E): the target holds experts lo:hi of E (their noise: those rows of E's)."""
    m = EXPERT_KEY.match(name)
    if m and m.group(2) in EXPERT_FROM_DENSE:
        dense_name, transpose = EXPERT_FROM_DENSE[m.group(2)]
        dense = source.get(m.group(1) + dense_name)
        if dense is None:
            return None
        one = dense.t() if transpose else dense  # (D, H), (H, D), (H,) or (D,)
        if m.group(2) in ("w_out", "b_out"):
            one = one * split
        stacked = one.unsqueeze(0).expand(t.shape[0], *one.shape).clone()  # (E, ...): E copies
        if noise > 0 and transpose and span is not None:
            stacked += noise * normal_rows(span[2], tuple(one.shape), span[0], span[1], 1.0, generator=gen).to(stacked)
        elif noise > 0 and transpose:  # weight matrices only; biases stay exact copies
            stacked += noise * torch.randn(stacked.shape, generator=gen).to(stacked)
        return stacked, [m.group(1) + dense_name]
    m = SHARED_KEY.match(name)
    if m:
        dense_name = f"{m.group(1)}{m.group(2)}.{m.group(3)}"
        dense = source.get(dense_name)
        if dense is None:
            return None
        if m.group(2) != "w_out":  # S copies of the hidden units side by side: (S*H, D) or (S*H,)
            return dense.repeat(shared, *([1] * (dense.dim() - 1))), [dense_name]
        if m.group(3) == "weight":  # (D, S*H): each copy's output scaled
            return dense.repeat(1, shared) * split, [dense_name]
        return dense * (shared * split), [dense_name]  # one output bias for the S copies
    return None


def _refuse_moe_to_dense(name: str, other: dict[str, Tensor]) -> None:
    """A layer's dense FFN tensor without a counterpart while the other side holds experts there:
    an MoE FFN cannot be folded back into a dense one."""
    m = re.match(r"^(layers\.(\d+)\.ffn\.)(w_in|w_gate|w_out)\.(weight|bias)$", name)
    if m and (m.group(1) + "experts.w_in") in other:
        raise ConfigError(
            f"cannot map the weights onto the target model: layer {m.group(2)}'s FFN is an MoE in the source but"
            " dense in the target (experts cannot be merged back into one FFN; keep model.ffn.kind=moe and its"
            " moe_every)"
        )


def upcycle(source: RoutedTransformer, target_cfg: ModelConfig, noise: float = 0.0, seed: int = 0) -> RoutedTransformer:
    """A ``RoutedTransformer(target_cfg)`` holding ``source``'s weights (see the module docstring):
    fresh tensors are initialised from ``seed`` (the global RNG is left as it was), noise on the
    expert copies too. ``target_cfg.vocab_size`` / ``num_labels`` None take the source's. The model
    is returned on the source's device, in the source's train/eval mode.

    Example::

        moe_cfg = dataclasses.replace(dense.cfg, ffn={"kind": "moe", "num_experts": 8, "router": "topk"})
        moe = upcycle(dense, moe_cfg)   # with renormalised top-k: moe(x).logits == dense(x).logits
    """
    return upcycle_with_conversion(source, target_cfg, noise, seed)[0]


def upcycle_with_conversion(
    source: RoutedTransformer, target_cfg: ModelConfig, noise: float = 0.0, seed: int = 0
) -> tuple[RoutedTransformer, Conversion]:
    """``upcycle``, also returning what was done with each tensor."""
    target_cfg = fill_from_source(target_cfg, source.cfg)
    check_convertible(source.cfg, target_cfg)  # before building: a refused size allocates nothing
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RoutedTransformer(target_cfg)
    device = device_of(source)
    done = upcycle_into(model, source.cfg, source.state_dict(), noise, torch.Generator().manual_seed(seed))
    return model.to(device).train(source.training), done
