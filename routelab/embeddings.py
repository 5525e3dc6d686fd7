"""Read pretrained word vectors in the word2vec / GloVe text format.

Each line is ``token v1 v2 ... vd``; word2vec files start with a header line ``count dim``.
"""

from __future__ import annotations

from pathlib import Path


def read_word_vectors(path: str | Path, dim: int, wanted: set[str] | None = None) -> dict[str, list[float]]:
    """Return ``{token: vector}`` for the tokens in ``wanted`` (all if None).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a vector's size differs from ``dim`` (model.d_model), or a value is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {str(path)!r} (model.embeddings_path) does not exist")
    vectors: dict[str, list[float]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header: "count dim"
            if len(parts) < 2:
                continue
            token, values = parts[0], parts[1:]
            if len(values) != dim:
                raise ValueError(
                    f"{path}:{line_no}: vector for {token!r} has {len(values)} values; "
                    f"model.d_model={dim} requires {dim}"
                )
            if wanted is not None and token not in wanted:
                continue
            try:
                vectors[token] = [float(v) for v in values]
            except ValueError:
                raise ValueError(f"{path}:{line_no}: vector for {token!r} holds a non-number") from None
    return vectors
