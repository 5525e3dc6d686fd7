"""Tag every UTF-8 byte of Python source with the class of the token it belongs to.

The classes come from the standard ``tokenize`` module (the tokenizer Python's own tools use), with
``keyword.iskeyword`` splitting keywords from names:

    space     bytes between tokens (spaces, tabs, indentation, line continuations)
    newline   NEWLINE and NL tokens (logical and blank-line ends)
    comment   ``# ...``
    keyword   hard keywords (``def``, ``if``, ``True``, ...); soft keywords (``match``, ``case``,
              ``type``, ``_``) are names, as ``tokenize`` reports them (telling them apart needs the parser)
    name      identifiers
    number    numeric literals
    string    string and bytes literals, docstrings; an f-string is one string as a whole, replacement
              fields included (as ``tokenize`` reports it up to Python 3.11; 3.12+ splits it and we join it back)
    operator  operators and delimiters

``tokenize`` gives positions as (row, column) in characters; they are turned into character offsets
and then into byte offsets (a character of k UTF-8 bytes gives k bytes of its class), so the labels
align 1:1 with the ids of the byte tokenizer.
"""

from __future__ import annotations

import io
import keyword
import re
import token
import tokenize

import numpy as np

from routelab.data.errors import DataError

TAG_NAMES = ("space", "newline", "comment", "keyword", "name", "number", "string", "operator")
SPACE, NEWLINE, COMMENT, KEYWORD, NAME, NUMBER, STRING, OPERATOR = range(len(TAG_NAMES))
_BY_TYPE = {
    token.NEWLINE: NEWLINE,
    token.NL: NEWLINE,
    token.COMMENT: COMMENT,
    token.NUMBER: NUMBER,
    token.STRING: STRING,
    token.OP: OPERATOR,
    token.INDENT: SPACE,
}
# Python 3.12+ (FSTRING_*) and 3.14+ (TSTRING_*) split f-/t-strings; a string spans START..END
_STRING_START = {getattr(token, n) for n in ("FSTRING_START", "TSTRING_START") if hasattr(token, n)}
_STRING_END = {getattr(token, n) for n in ("FSTRING_END", "TSTRING_END") if hasattr(token, n)}


def _tag_of(tok: tokenize.TokenInfo) -> int:
    if tok.type == token.NAME:
        return KEYWORD if keyword.iskeyword(tok.string) else NAME
    if tok.type == token.ERRORTOKEN:  # stray characters tokenize could not classify (none in the stdlib)
        return SPACE if tok.string.isspace() else OPERATOR
    return _BY_TYPE.get(tok.type, SPACE)  # DEDENT, ENDMARKER, ENCODING: empty


def tag_chars(text: str) -> np.ndarray:
    """The tag (index into ``TAG_NAMES``) of every character of ``text``.

    Returns:
        (len(text),) int64.

    Raises:
        DataError: ``tokenize`` refuses the text (unterminated string, bad indentation, ...).
    """
    starts = [0] + [m.end() for m in re.finditer("\n", text)]  # offset of row r + 1 (readline splits at \n only)

    def offset(row: int, col: int) -> int:
        return starts[min(row - 1, len(starts) - 1)] + col if row >= 1 else 0

    tags = np.full(len(text), SPACE, dtype=np.int64)
    open_at: list[int] = []  # start offsets of f-strings being read (3.12+; they nest)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in _STRING_START:
                open_at.append(offset(*tok.start))
            elif tok.type in _STRING_END:
                begin = open_at.pop()
                if not open_at:  # the outermost f-string closed: one string
                    tags[begin : offset(*tok.end)] = STRING
            elif not open_at:
                tags[offset(*tok.start) : offset(*tok.end)] = _tag_of(tok)
    except (tokenize.TokenError, SyntaxError) as e:  # IndentationError is a SyntaxError
        raise DataError(f"Python's tokenize refuses this text: {type(e).__name__}: {e}") from None
    return tags


def utf8_lengths(text: str) -> np.ndarray:
    """The UTF-8 length (1..4) of every character of ``text``, shape (len(text),) int64."""
    cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    return 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)


def tag_bytes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of ``text`` and the tag of each byte (its character's tag).

    Returns:
        ``(ids, tags)``, both (len(text.encode('utf-8')),) int64: ``ids`` are the byte values (the
        byte tokenizer's ids), ``tags`` index ``TAG_NAMES``.
    """
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    tags = np.repeat(tag_chars(text), utf8_lengths(text))
    return ids, tags
