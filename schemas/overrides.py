"""Spec files: the one YAML loader of every spec, dotted overrides from the command line, one-line errors.

Every spec a user writes (a render job, a synthesis or catalog spec, a schedule, what `submit` uploads) is read
by `read_spec_file`: safe loading only (a `!!python/...` tag is refused, never run), a mapping at the top, and a
syntax error named by file, line and column. `validate_spec` turns pydantic's errors into one line naming the
file or the flag at fault, with "did you mean" for a mistyped field. The CLI prints `SpecFileError` as that line.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from schemas.errors import FluxbatchError

Spec = TypeVar("Spec", bound=BaseModel)

# A plain value where these mappings go is their one essential field: `output: s3://b/run` means
# `output: {uri: s3://b/run}`, `model: flux.1-dev` means `model: {name: flux.1-dev}`. Expanded before the
# command line's overrides land, so `--layout` beside `output: /path` keeps the path. (README, "Job files".)
SHORTHANDS: dict[str, tuple[str, str]] = {"output": ("uri", "/path"), "model": ("name", "flux.1-dev")}


class SpecFileError(FluxbatchError, ValueError):
    """A spec that cannot be read, parsed or validated; the message names the file (or flag), the field, the fix."""


def read_spec_file(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML spec file as a mapping of fields; `what` ("job", "schedule" ...) names the file in errors."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecFileError(f"no {what} file at {str(path)!r}") from None
    except UnicodeDecodeError:
        raise SpecFileError(f"{path}: the {what} file is not UTF-8 text; write it as YAML") from None
    except OSError as error:
        raise SpecFileError(f"cannot read the {what} file {path}: {error.strerror}") from error
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecFileError(_yaml_problem(path, error)) from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: a {what} file must be a mapping of fields (`key: value` lines), "
                            f"got a {_kind(data)}")
    return data


def _yaml_problem(path: str | Path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error)
    if isinstance(error, yaml.constructor.ConstructorError) and "tag" in problem:
        tag = problem.split("'")[1] if problem.count("'") >= 2 else problem
        tag = tag.replace("tag:yaml.org,2002:", "!!")
        return (f"{where}: the tag {tag} is not allowed: fluxbatch reads plain YAML only (safe loading, no Python "
                "objects); write a plain value")
    context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and context_mark and (not mark or context_mark.line != mark.line):
        problem += f" ({context} that starts at line {context_mark.line + 1})"
    return f"{where}: {problem}; the file is not valid YAML"


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "true/false"}.get(
        type(value), type(value).__name__)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Set each dotted key (`model.name`) in `data`, creating parents; None means "not given" and is skipped."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for depth, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                where = f"{source}: " if source else ""
                raise SpecFileError(where + _not_a_mapping(".".join(parents[:depth + 1]), node[part]))
            node = node[part]
        node[leaf] = value
    return data


def _not_a_mapping(dotted: str, value: Any) -> str:
    if dotted in SHORTHANDS:
        field, example = SHORTHANDS[dotted]
        return f"{dotted} must be a mapping like {{{field}: {example}}}, or the {field} alone; got {value!r}"
    return f"{dotted} must be a mapping of fields (`key: value`), got {value!r}"


def spec_data(path: str | Path, what: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A spec file's fields, shorthands expanded, with `overrides` (dotted keys) applied over them."""
    data = read_spec_file(path, what)
    for key, (field, _) in SHORTHANDS.items():
        if isinstance(data.get(key), str):
            data[key] = {field: data[key]}
    return apply_overrides(data, overrides, str(path))


def load_spec(model: type[Spec], path: str | Path, what: str, overrides: dict[str, Any] | None = None) -> Spec:
    """Read, override and validate a spec file in one step; every mistake is a `SpecFileError` naming the file."""
    return validate_spec(model, spec_data(path, what, overrides or {}), source=str(path))


def validate_spec(model: type[Spec], data: dict[str, Any], *, source: str | None = None,
                  flags: dict[str, str] | None = None, context: dict[str, Any] | None = None) -> Spec:
    """`model` validated from `data` (with the validation `context`, if any); errors become one line naming the flag
    (`flags`: field -> flag as typed), else the file (`source`), the field and the fix."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        problems: dict[tuple[str, str, str, str], list[str]] = {}
        for item in error.errors(include_url=False):
            *key, text = _problem(model, item, source, flags or {})
            problems.setdefault(tuple(key), []).append(text)
        parts, last = [], None
        for (_, where, field, got), texts in problems.items():
            # A union tried each member ("a valid number", "'auto'"): one sentence with "or".
            text = " or ".join([texts[0], *(t.removeprefix("Input should be ") for t in texts[1:])])
            parts.append(f"{where + ': ' if where and where != last else ''}{field}{text}{got}")
            last = where
        raise SpecFileError("; ".join(parts)) from error


def _problem(model: type[BaseModel], item: dict[str, Any], source: str | None,
             flags: dict[str, str]) -> tuple[str, str, str, str, str]:
    """(the field's path; where: the flag or the file; the field as shown; the value given; what is wrong)."""
    loc, kind, value = tuple(item.get("loc") or ()), item.get("type"), item.get("input")
    # A union reports each member it tried (`gpus_per_replica.float`, `...literal['auto']`): name the field once.
    while kind != "extra_forbidden" and loc and _step(_annotation_at(model, loc[:-1]), loc[-1]) is None:
        loc = loc[:-1]
    dotted = ".".join(str(part) for part in loc)
    flag = next((typed for field, typed in flags.items() if dotted == field or dotted.startswith(field + ".")), None)
    where = flag or source or ""
    if kind == "extra_forbidden":
        known = _fields_of(model, loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}?" if near else f"known: {', '.join(known)}"
        return dotted, where, "", "", f"unknown field {dotted!r} ({hint})"
    if kind == "missing":
        return dotted, where, "", "", f"{dotted} is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return dotted, where, "", "", _not_a_mapping(dotted, value)
    message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
    if flag:  # the flag as typed shows the value
        return dotted, where, "", "", message
    got = f", got {value!r}" if isinstance(value, (str, int, float)) and len(repr(value)) < 80 else ""
    if (repr(value) if isinstance(value, str) else f"got {value}") in message:  # a row's rule says it already
        got = ""
    return dotted, where, f"{dotted}: " if dotted else "", got, message


def _members(annotation: Any) -> list[Any]:
    """The types a field may hold: Optional and unions flattened."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _step(annotation: Any, part: Any) -> Any:
    """The annotation of `part` (a field name, list index or mapping key) inside a value of `annotation`."""
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            if part in member.model_fields:
                return member.model_fields[part].annotation
        elif typing.get_origin(member) in (list, dict, tuple, set) and typing.get_args(member):
            return typing.get_args(member)[-1]
    return None


def _annotation_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    annotation: Any = model
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return None
    return annotation


def _fields_of(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names a mapping at `loc` may hold (empty where it is not a spec model)."""
    annotation = _annotation_at(model, loc)
    for member in _members(annotation) if annotation is not None else []:
        if isinstance(member, type) and issubclass(member, BaseModel):
            return list(member.model_fields)
    return []
