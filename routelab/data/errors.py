"""The one error type of ``routelab.data``: bad input names what was wrong and what is allowed."""

from __future__ import annotations


class DataError(ValueError):
    """Data could not be read, tokenised or batched; the message says why and what is allowed."""


def hf_missing(package: str) -> DataError:
    """The error raised when an optional Hugging Face package is not installed."""
    return DataError(f"this needs the optional package {package!r}; install it with: pip install 'routelab[hf]'")
