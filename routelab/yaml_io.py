"""Reading configs: YAML files (safely), ``base:`` presets, and ``--set a.b=c`` overrides.

Everything here works on plain mappings, before ``routelab.conversion`` turns them into the
dataclasses of ``routelab.config``; a problem raises a one-line ``ConfigError`` naming the file
(with line and column for a YAML syntax error) or the override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from routelab.errors import ConfigError

__all__ = [
    "MAX_YAML_VALUES", "apply_overrides", "deep_merge", "load_yaml", "parse_scalar", "read_yaml_mapping", "resolve_base",
]


def resolve_base(data: dict, path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Expand ``base: other.yaml`` (a path relative to this file): this file's keys are merged over
    the base's, section by section, so a variant preset holds only what differs."""
    if "base" not in data:
        return data
    base_path = (path.parent / str(data["base"])).resolve()
    if not base_path.is_file():
        raise ConfigError(f"{str(path)!r}: base {data['base']!r} not found (looked for {str(base_path)!r})")
    if base_path in seen:
        raise ConfigError(f"{str(path)!r}: base configs form a cycle through {str(base_path)!r}")
    base = resolve_base(read_yaml_mapping(base_path, "base config"), base_path, (*seen, path.resolve()))
    return deep_merge(base, {k: v for k, v in data.items() if k != "base"})


def read_yaml_mapping(path: Path, what: str = "config file") -> dict:
    """The mapping a YAML file holds (an empty file is ``{}``). A problem raises ``ConfigError`` naming
    the file; a syntax error gives its line and column (1-based) and nothing more, so it fits on one
    line: ``'x.yaml' line 3, column 7: mapping values are not allowed here``."""
    try:
        text = path.read_text(encoding="utf-8")  # YAML is UTF-8 whatever the locale says
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    try:
        data = load_yaml(text, f"{what} {str(path)!r}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} {yaml_error_position(e, text)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping (section: value), got {type(data).__name__}")
    return data


MAX_YAML_VALUES = 100_000  # values a YAML document may hold once its aliases are expanded (a config holds hundreds)


def load_yaml(text: str, name: str) -> Any:
    """``yaml.safe_load(text)``, refusing (``ConfigError`` naming ``name``) a document that expands to
    more than ``MAX_YAML_VALUES`` values through its aliases, one whose alias contains itself, or one
    nested too deeply for the parser. Anchors and aliases (``&base`` / ``*base``) stay usable.

    A "billion laughs" file (nine levels of nine aliases, about 300 bytes) loads as a graph of shared
    nodes but expands to 9^9 values wherever it is copied or walked; the expanded size is counted on
    the composed node graph, each anchored node once, so the check costs what the file's length does."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values = _expanded_size(node, {}, set(), name)
        if values > MAX_YAML_VALUES:
            raise ConfigError(
                f"{name} expands to {values:,} values through its aliases (*name); at most {MAX_YAML_VALUES:,}"
                " are allowed: repeat fewer aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply to read (more than several hundred levels)") from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int], name: str) -> int:
    """Values under ``node`` (itself included) with every alias spelled out; ``sizes`` memoises the
    nodes already counted (an alias is the same node object as its anchor), ``open_nodes`` are the
    ones being counted, so an alias inside its own anchor is found."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        line = node.start_mark.line + 1 if node.start_mark else "?"
        raise ConfigError(f"{name} line {line}: an alias refers to a value that contains it (a recursive alias)")
    open_nodes.add(key)
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = node.value
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, open_nodes, name) for child in children)
    open_nodes.discard(key)
    sizes[key] = size
    return size


def yaml_error_position(e: yaml.YAMLError, text: str) -> str:
    """``line 3, column 7: <problem>`` for a PyYAML error (its marks are 0-based); the construct it was
    reading, when PyYAML names one, follows in brackets."""
    if isinstance(e, yaml.MarkedYAMLError) and (e.problem_mark or e.context_mark):
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem or e.context}"
        if e.problem and e.context:
            at = f" from line {e.context_mark.line + 1}, column {e.context_mark.column + 1}" if e.context_mark else ""
            where += f" ({e.context}{at})"
        return where
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML refuses; it knows only the offset
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        code = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return f"line {line}, column {column}: character {code} is not allowed in YAML"
    return f"is not valid YAML: {' '.join(str(e).split())}"


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        out[key] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def apply_overrides(data: dict, overrides: list[str], values: dict[str, Any] | None = None) -> dict:
    """Apply ``a.b.c=value`` strings to a nested dict; values are parsed as YAML scalars; then
    ``values`` (``{"a.b.c": value}``), set as given (a command-line option such as ``--init-from
    DIR``, whose path must not be read as YAML).

    ``--set model.d_model=256`` -> ``data['model']['d_model'] = 256``. Keys are checked later by
    ``from_dict``, so a typo still gets its "did you mean". A section given by its kind alone
    (``router: topk``) opens as ``{kind: topk}`` when a key below it is set
    (``model.ffn.router=topk`` then ``model.ffn.router.top_k=3``).
    """
    data = _copy_tree(data)
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. model.d_model=256)")
        dotted, raw = item.split("=", 1)
        pairs.append((item, dotted, parse_scalar(raw)))
    pairs += [(f"{dotted}={value}", dotted, value) for dotted, value in (values or {}).items()]
    for item, dotted, value in pairs:
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"override {item!r} has an empty key; expected section.key=value")
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if isinstance(nxt, str):  # a registered section named by its kind alone
                nxt = node[k] = {"kind": nxt}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {k!r} is a value, not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def _copy_tree(value: Any) -> Any:
    """A copy of nested mappings and lists, each alias of the YAML its own copy (so an override
    changes one place), leaves kept as YAML read them (a date stays a date for the type check)."""
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    return value


def parse_scalar(raw: str) -> Any:
    """A ``--set`` value: YAML (``true``, ``[1, 2]``, ``null``), plus numbers YAML 1.1 reads as
    strings (``1e-6``, ``3E4``), so ``--set train.lr=1e-3`` is a float."""
    if not raw.strip():
        return ""
    try:
        value = load_yaml(raw, f"--set value {raw!r}")
    except yaml.YAMLError:
        return raw
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return value
