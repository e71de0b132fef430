"""Spec files in YAML with dotted overrides (`model.name=...`): how the CLI's flags win over a job file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key (`model.name`) in `data`, creating parents; None means "not given" and is skipped."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def load_spec_file(path: str | Path, what: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A YAML spec file as a mapping, with `overrides` applied; `what` names the file in the error."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a {what} file must be a mapping of fields, got {type(data).__name__}")
    return apply_overrides(data, overrides)
