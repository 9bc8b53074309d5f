"""Reading YAML files written by people: one clear error line for a missing file, text that is not UTF-8, bad YAML
(with its line and column), duplicate keys (YAML keeps the last one silently) and alias bombs (a few lines whose
aliases expand to billions of values)."""
from __future__ import annotations

import typing
from pathlib import Path

import yaml

from .errors import NewsloraError

# a YAML document may not expand (aliases followed) to more values than this
MAX_YAML_VALUES = 100_000
MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (YAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *base`: keys given beside it override the merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise NewsloraError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                                    f"{seen[key]}): keep one of them")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict, depth: int = 0) -> int:
    """Values in a YAML node once its aliases are expanded (shared nodes counted every time they appear)."""
    if id(node) in memo:
        return memo[id(node)]
    if depth > 200:
        return MAX_YAML_VALUES + 1
    memo[id(node)] = MAX_YAML_VALUES + 1  # a node that contains itself expands without end
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, memo, depth + 1) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, depth + 1) + _expanded_size(v, memo, depth + 1) for k, v in node.value)
    memo[id(node)] = min(size, MAX_YAML_VALUES + 1)
    return memo[id(node)]


def parse_yaml(text: str):
    """The value of a YAML document: duplicate keys and alias bombs refused."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise NewsloraError(f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; write the "
                                "values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path, what: str, option: str, example: str) -> dict:
    """A YAML file holding a mapping, or one clear error line (missing file, not UTF-8, bad YAML, duplicate keys,
    alias bombs, not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise NewsloraError(f"{what} not found: {path} (pass {option} with a YAML file, e.g. {example})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NewsloraError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = parse_yaml(text) or {}
    except NewsloraError as e:
        raise NewsloraError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise NewsloraError(f"{path} is not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise NewsloraError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line, column)."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).strip().split("\n")[0]
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = " (indent YAML with spaces, not tabs)" if "\t" in str(problem) or "\\t" in str(problem) else ""
    return f"{problem}{where}{hint}"
