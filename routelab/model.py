"""RoutedTransformer: embeddings, pre-norm blocks with pluggable attention and FFN, task heads.

Pre-norm residual blocks (Xiong et al. 2020): x = x + attn(norm(x)); x = x + ffn(norm(x)), then a
final norm. ``norm_position: post`` gives the original post-norm block (Vaswani et al. 2017, BERT):
x = norm(x + attn(x)); x = norm(x + ffn(x)), with no final norm.
The attention and FFN modules come from registries keyed by ``cfg.attention.kind`` and
``cfg.ffn.kind``, so routing families plug in without touching this file.

Heads:
- ``lm``: next-token logits over the vocabulary (optionally tied to the embeddings).
- ``classification``: the final representation of the leading CLS token -> linear -> softmax,
  trained with cross-entropy.
- ``token_classification``: a label per token.

Multi-task (``cfg.task_names``): one body, a head per task in ``heads`` (a ModuleDict keyed by task
name; a single-task model keeps its one ``head``, so old checkpoints load). ``forward(...,
task_ids=(B,))`` picks each row's head; the FFNs receive the task id of every token. One body means
one ``causal`` value; a classification head over a causal body reads the last real token (the only
one that has seen the whole input) instead of the leading CLS token.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.attention import KVCache, build_attention
from routelab.attention.base import Combine
from routelab.config import ModelConfig, model_config_from_dict, to_dict
from routelab.errors import ConfigError
from routelab.ffn import build_ffn
from routelab.moe.experts import Experts

IGNORE_INDEX = -100  # label value that is not scored (padding, positions without a label)
# tensors added after checkpoints without them were written; absent = zero gives the older model exactly
ZERO_IF_ABSENT = ("w_gate.bias", "experts.b_gate")  # the SwiGLU gate's bias (dense FFN had it; experts did not)
CONFIG_JSON = "config.json"  # save_pretrained's files
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ModelOutput:
    """What ``RoutedTransformer.forward`` returns.

    Attributes:
        logits: (B, T, V) for lm, (B, L) for classification, (B, T, L) for token classification.
        loss: task loss + aux_loss, or None without labels.
        aux_loss: sum of the layers' weighted auxiliary losses (scalar; 0 for dense layers).
        routing: per-layer routing statistics, e.g. ``{"layers.0.ffn": {...}}``; empty for dense.
        task_loss: the task loss alone (for evaluation and bits-per-byte), or None.
        hidden: (B, T, D) final hidden states, after the final norm (what the head reads); a
            reference, not a copy (knowledge distillation matches them to a teacher's).
    """

    logits: Tensor
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    routing: dict = field(default_factory=dict)
    task_loss: Tensor | None = None
    hidden: Tensor | None = None


def build_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Block(nn.Module):
    """One Transformer block, pre-norm or post-norm (``cfg.norm_position``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, expert_slice: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.attn_norm = build_norm(cfg)
        self.attn = build_attention(cfg, layer_idx)
        self.combine = Combine(cfg.d_model, cfg.attention.combine)  # x + a, or a linear map of [x; a]
        self.ffn_norm = build_norm(cfg)
        self.ffn = build_ffn(cfg, layer_idx, expert_slice)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, padding_mask=None, cache=None, token_ids=None, return_routes=False, task_ids=None):
        """x: (B, T, D) -> (x (B, T, D), FFNOutput), plus the attention routes with ``return_routes``;
        task_ids (B, T): each token's task, passed to the attention and the FFN only when given."""
        post = self.post_norm
        by_task = {"task_ids": task_ids} if task_ids is not None else {}
        a = self.attn(x if post else self.attn_norm(x), padding_mask=padding_mask, cache=cache, return_routes=return_routes, **by_task)
        a, routes = a if return_routes else (a, None)
        x = self.combine(x, self.dropout(a))
        if post:
            x = self.attn_norm(x)
        ffn_pad = padding_mask[:, -x.shape[1] :] if padding_mask is not None else None
        out = self.ffn(x if post else self.ffn_norm(x), token_ids=token_ids, padding_mask=ffn_pad, **by_task)
        x = x + self.dropout(out.hidden)
        if post:
            x = self.ffn_norm(x)
        return (x, out, routes) if return_routes else (x, out)


class RoutedTransformer(nn.Module):
    """A Transformer whose attention and FFN layers are chosen by config (see module docstring).

    ``expert_slice`` (index, size): every MoE layer holds only slice ``index`` of its experts split in
    ``size`` (expert parallelism builds each process's model so); every tensor, and every held
    expert, starts as in the model built whole from the same seed."""

    def __init__(self, cfg: ModelConfig, expert_slice: tuple[int, int] | None = None) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is None; set it, or let the trainer take it from the tokenizer")
        if cfg.task_names is None and cfg.head != "lm" and cfg.num_labels is None:
            raise ConfigError(f"model.num_labels is None; the {cfg.head!r} head needs the number of labels")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.embed_norm = build_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i, expert_slice) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg) if cfg.norm_position == "pre" else None  # post-norm blocks end normalised
        if cfg.task_names is None:
            self.head = self._new_head(cfg.head, cfg.num_labels)
        else:  # one head per task, keyed by its name
            self.heads = nn.ModuleDict(
                {name: self._new_head(h, n) for name, h, n in zip(cfg.task_names, cfg.task_heads, cfg.task_num_labels)}
            )
        self.reset_parameters()
        for kind, head in self._heads():
            if kind == "lm" and cfg.tie_embeddings:
                head.weight = self.tok_emb.weight
        if cfg.freeze_embeddings:
            self.tok_emb.weight.requires_grad_(False)

    def _new_head(self, kind: str, num_labels: int | None) -> nn.Linear:
        if kind != "lm" and num_labels is None:
            raise ConfigError(f"the number of labels of a {kind!r} head is None; set model.num_labels / model.task_num_labels")
        return nn.Linear(self.cfg.d_model, self.cfg.vocab_size if kind == "lm" else num_labels, bias=kind != "lm")

    def _heads(self) -> list[tuple[str, nn.Linear]]:
        """(kind, module) of every head: the one ``head``, or each task's."""
        if self.cfg.task_names is None:
            return [(self.cfg.head, self.head)]
        return [(kind, self.heads[name]) for name, kind in zip(self.cfg.task_names, self.cfg.task_heads)]

    def task_head(self, task: int) -> tuple[str, nn.Linear, int | None]:
        """(head kind, head module, number of labels) of task index ``task`` (0 for a single-task model)."""
        cfg = self.cfg
        if cfg.task_names is None:
            if task != 0:
                raise ValueError(f"task id {task} given to a single-task model (model.task_names is null)")
            return cfg.head, self.head, cfg.num_labels
        if not 0 <= task < len(cfg.task_names):
            raise ValueError(f"task id {task} is out of range; allowed: 0..{len(cfg.task_names) - 1} ({', '.join(cfg.task_names)})")
        return cfg.task_heads[task], self.heads[cfg.task_names[task]], cfg.task_num_labels[task]

    def reset_parameters(self, names: Collection[str] | None = None) -> None:
        """The model's initialisation: N(0, init_std) weights of every Linear and Embedding, zero
        Linear biases, then GPT-2's scaled init N(0, init_std / sqrt(2 n_layers)) of the residual
        projections (Radford et al. 2019). ``names``: re-initialise only the modules owning these
        parameters, as a newly built model has them (an import initialises so the parameters its
        checkpoint lacks); owners other than Linear, Embedding, LayerNorm and RMSNorm are refused,
        since their constructors' initialisation is their own."""
        if names is None:
            self.apply(self._init_weights)
        else:
            for owner in sorted({name.rpartition(".")[0] for name in names}):
                module = self.get_submodule(owner)
                if not isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
                    raise ValueError(f"cannot re-initialise {owner!r} ({type(module).__name__}) alone; allowed: Linear, Embedding, LayerNorm and RMSNorm parameters")
                module.reset_parameters()
                self._init_weights(module)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if names is not None and name not in names:
                continue
            std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
            if name.endswith(("o_proj.weight", "w_out.weight")):
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("experts.w_out"):  # a slice draws its rows of the whole tensor's values
                self.get_submodule(name.rpartition(".")[0]).normal_(p, std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------
    def new_cache(self) -> list[KVCache]:
        """One empty KV cache per layer, for ``forward(..., cache=...)``."""
        return [KVCache() for _ in self.layers]

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: list[KVCache] | None = None,
        token_type_ids: Tensor | None = None,
        task_ids: Tensor | None = None,
    ) -> ModelOutput:
        """Run the model.

        Shapes: B batch, T tokens, D model dim, V vocabulary, L labels.

        Args:
            input_ids: (B, T) token ids.
            labels: lm: (B, T) ids, shifted inside (position t predicts labels[t+1]); classification:
                (B,); token classification: (B, T). ``-100`` is ignored.
            attention_mask: (B, T) or, with a cache, (B, cached + T); 1/True = real token, 0 = padding.
            cache: per-layer ``KVCache`` list from ``new_cache()`` for incremental decoding.
            token_type_ids: (B, T) segment ids < ``type_vocab_size`` (models with token types;
                None = all zeros).
            task_ids: (B,) task index of each row (multi-task models; None = task 0). One call may mix
                tasks whose heads have the same kind and size (each row goes through its own task's
                head); the trainer mixing tasks in a batch calls once per task.
        """
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        task = 0
        token_tasks = None
        if task_ids is not None:
            if task_ids.shape != (B,):
                raise ValueError(f"task_ids must be (batch,) = ({B},), one task per sequence; got shape {tuple(task_ids.shape)}")
            present = sorted(set(task_ids.tolist()))
            task = present[0]
            shapes = {(self.task_head(t)[0], self.task_head(t)[2]) for t in present}
            if len(shapes) > 1:
                raise ValueError("task_ids mixes tasks whose heads differ (kind or classes); allowed in one call: tasks "
                                 "with heads of the same kind and size, or call the model once per task")
            token_tasks = task_ids[:, None].expand(B, T)  # (B, T): each token's task, for task-aware FFNs
        kind, head, n_labels = self.task_head(task)
        offset = cache[0].offset if cache else 0
        if offset + T > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {offset + T} exceeds model.max_seq_len={cfg.max_seq_len}; "
                "truncate the input (data.truncate=true) or raise model.max_seq_len"
            )
        if cache is not None and not cfg.causal:
            raise ValueError("a KV cache needs a causal model (model.causal=true); encoders see the future")
        padding_mask = None
        if attention_mask is not None:
            padding_mask = attention_mask == 0  # (B, S) True = padding
            if not padding_mask.any():
                padding_mask = None
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(offset, offset + T, device=input_ids.device))
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_emb(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but the model has no token types (model.type_vocab_size=0)")
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        aux_losses, routing = [], {}
        for i, layer in enumerate(self.layers):
            x, out = layer(x, padding_mask=padding_mask, cache=cache[i] if cache else None, token_ids=input_ids, task_ids=token_tasks)
            if out.aux_loss is not None:
                aux_losses.append(out.aux_loss)
            if out.stats:
                routing[f"layers.{i}.ffn"] = out.stats
        if self.norm is not None:
            x = self.norm(x)
        if kind == "classification":
            x_read = x[torch.arange(B, device=x.device), self.readout_positions(B, T, attention_mask, x.device)]  # (B, D)
        else:
            x_read = x  # (B, T, D)
        if task_ids is None or len(present) == 1:
            logits = head(x_read)  # (B, L) or (B, T, V or L)
        else:  # rows of several tasks whose heads have the same shape: each row through its own task's head
            logits = torch.cat([self.task_head(t)[1](x_read[task_ids == t]) for t in present])
            order = torch.cat([(task_ids == t).nonzero().squeeze(1) for t in present])  # row of each concatenated output
            logits = logits[torch.argsort(order)]
        aux = torch.stack(aux_losses).sum() if aux_losses else logits.new_zeros(())
        task_loss = self.task_loss(logits, labels, kind, n_labels) if labels is not None else None
        loss = task_loss + aux if task_loss is not None else None
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, routing=routing, task_loss=task_loss, hidden=x)

    def readout_positions(self, B: int, T: int, attention_mask: Tensor | None, device: torch.device) -> Tensor:
        """(B,) the position a classification head reads: the leading CLS token (0) of an encoder;
        in a multi-task model with a causal body, the last real token (padding is on the right)."""
        if not (self.cfg.causal and self.cfg.task_names is not None):
            return torch.zeros(B, dtype=torch.long, device=device)
        if attention_mask is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=device)
        return (attention_mask[:, -T:] != 0).long().sum(-1).clamp(min=1) - 1

    def task_loss(self, logits: Tensor, labels: Tensor, kind: str | None = None, n_labels: int | None = None) -> Tensor:
        """Cross-entropy of ``kind``'s logits (default: the single-task head's) against ``labels``."""
        cfg = self.cfg
        kind = kind or cfg.head
        if kind == "lm":
            logits, labels = logits[:, :-1], labels[:, 1:]  # position t predicts token t+1
            n_classes = cfg.vocab_size
        else:
            n_classes = n_labels if n_labels is not None else cfg.num_labels
        scored = labels[labels != IGNORE_INDEX]
        if scored.numel() and (scored.min() < 0 or scored.max() >= n_classes):
            bad = scored[(scored < 0) | (scored >= n_classes)][0].item()
            raise ValueError(f"label {bad} is out of range; allowed: 0..{n_classes - 1} (or -100 to ignore)")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    # ------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, reading state dicts that predate a zero-initialised tensor
        added later (``ZERO_IF_ABSENT``): an absent one is zero, exactly the older model."""
        state = dict(state_dict)
        for name, tensor in self.state_dict().items():
            if name not in state and name.endswith(ZERO_IF_ABSENT):
                state[name] = torch.zeros_like(tensor)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def expert_rows(self) -> dict[str, tuple[int, int, int]]:
        """State-dict name -> (lo, hi, total) of every expert tensor that holds only rows lo:hi of its
        layer's (total, ...) experts (a model built with ``expert_slice``); empty for a whole model."""
        rows = {}
        for prefix, m in self.named_modules():
            if isinstance(m, Experts) and m.expert_slice is not None:
                lo = m.first_expert
                rows.update({f"{prefix}.{n}": (lo, lo + m.num_experts, m.total_experts) for n, _ in m.named_parameters()})
        return rows

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` then ``config.json`` into ``directory``, each atomically.

        ``config.json`` is the model config plus ``weights_sha256``, the checksum of the weights
        written with it; it is written last, so a folder whose two files do not belong together (a
        write killed between them, a copied-over file) fails ``from_pretrained``'s check. The weights
        are written one tensor at a time (``routelab.io.save_state_dict``)."""
        from routelab.io import save_state_dict

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        digest = save_state_dict(self.state_dict(), directory / WEIGHTS_FILE)
        write_config_json(directory, self.cfg, digest)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> RoutedTransformer:
        """Rebuild a model written by ``save_pretrained``, in eval mode.

        Before anything is allocated, the sizes in ``config.json`` are checked against the tensor
        shapes in the weights file's header (an edited config cannot ask for more memory than the
        weights hold), and the weights against ``weights_sha256``. Every problem raises one error
        naming the file (``DamagedFileError`` or ``ConfigError``)."""
        from routelab.io import DamagedFileError, load_state_dict, read_json, verify_sha256

        directory = Path(directory)
        cfg_path = directory / CONFIG_JSON
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{str(cfg_path)!r} not found: is {str(directory)!r} a saved routelab model?")
        data = read_json(cfg_path)
        if not isinstance(data, dict):
            raise DamagedFileError(cfg_path, f"it holds a {type(data).__name__}, not a model config mapping")
        digest = data.pop("weights_sha256", None)
        try:
            cfg = model_config_from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{str(cfg_path)!r}: {e}") from None
        weights = directory / WEIGHTS_FILE
        verify_sha256(weights, digest)
        check_weights_file(cfg, weights, str(cfg_path))
        model = cls(cfg)  # built on the CPU: read the weights there, then move them once
        model.load_state_dict(load_state_dict(weights))
        return model.to(map_location).eval()

    def load_word_vectors(self, path: str | Path, vocab: list[str]) -> int:
        """Initialise token embeddings from a word2vec/GloVe text file; returns rows filled.

        ``vocab[i]`` is the string of token id i. A word2vec header line ("count dim") is skipped.
        """
        from routelab.embeddings import read_word_vectors

        vectors = read_word_vectors(path, self.cfg.d_model, wanted=set(vocab))
        weight = self.tok_emb.weight
        filled = 0
        with torch.no_grad():
            for i, tok in enumerate(vocab):
                vec = vectors.get(tok)
                if vec is not None:
                    weight[i] = torch.tensor(vec, dtype=weight.dtype, device=weight.device)
                    filled += 1
        return filled


def write_config_json(directory: str | Path, cfg: ModelConfig, weights_sha256: str) -> None:
    """A saved model's ``config.json``: ``cfg`` plus the SHA-256 of the weights written beside it.
    Written last (atomically): it is what makes the folder a complete model."""
    from routelab.io import atomic_write_json

    atomic_write_json(Path(directory) / CONFIG_JSON, {**to_dict(cfg), "weights_sha256": weights_sha256})


# ----------------------------------------------------------------------------------------------
# checking weights against a config before allocating


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the state dict of ``RoutedTransformer(cfg)``, built on the
    meta device (no memory, no initialisation), so any size a config claims can be checked first."""
    with torch.device("meta"):
        model = RoutedTransformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights_file(cfg: ModelConfig | dict[str, tuple[int, ...]], path: str | Path, config_name: str) -> None:
    """Raise ``DamagedFileError`` naming ``path`` unless its tensors are exactly those of a model built
    from ``cfg`` (or of the given name -> shape dict): same names, same shapes. Reads only the header."""
    from routelab.io import DamagedFileError, read_shapes

    expected = state_shapes(cfg) if isinstance(cfg, ModelConfig) else cfg
    found = read_shapes(path)
    problems = [f"{k} is {found[k]} in the file but {expected[k]} by the config" for k in expected if k in found and found[k] != expected[k]]
    missing = sorted(k for k in set(expected) - set(found) if not k.endswith(ZERO_IF_ABSENT))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {', '.join(extra[:3])})")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise DamagedFileError(path, f"its tensors do not match {config_name}: {shown}")
