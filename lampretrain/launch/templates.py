"""Filling the templates under ``cluster/``: ``{{name}}`` placeholders in shell text and in YAML data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .. import resources
from ..config import ConfigError

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def template_path(relative: str) -> Path:
    path = resources.path(f"cluster/{relative}")
    if not path.exists():
        raise ConfigError(f"{path}: template not found; reinstall lampretrain (its wheel ships cluster/)")
    return path


def fill_text(text: str, values: dict[str, str], where: str) -> str:
    """Replace every ``{{name}}`` in ``text``; a placeholder without a value is an error naming it."""

    def sub(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise ConfigError(f"{where}: no value for placeholder '{key}'")
        return str(values[key])

    return _PLACEHOLDER.sub(sub, text)


def fill_data(node: Any, values: dict[str, Any], where: str) -> Any:
    """Fill YAML data: a string that is exactly ``{{name}}`` becomes the value itself (any type), so
    lists and mappings keep their structure; placeholders inside longer strings are substituted as text."""
    if isinstance(node, dict):
        return {k: fill_data(v, values, where) for k, v in node.items()}
    if isinstance(node, list):
        return [fill_data(v, values, where) for v in node]
    if isinstance(node, str):
        whole = _PLACEHOLDER.fullmatch(node.strip())
        if whole:
            if whole.group(1) not in values:
                raise ConfigError(f"{where}: no value for placeholder '{whole.group(1)}'")
            return values[whole.group(1)]
        return fill_text(node, values, where)
    return node


def load_template_yaml(relative: str) -> dict[str, Any]:
    path = template_path(relative)
    return yaml.safe_load(path.read_text())


def drop_none(node: Any) -> Any:
    """Remove mapping entries whose value is None (optional fields the profile leaves unset)."""
    if isinstance(node, dict):
        return {k: drop_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [drop_none(v) for v in node]
    return node
