"""The `render` and `validate` flags, generated from `JobSpec`, so a job option is written once (in schemas/job.py).

Each leaf field of the spec (`replicas`, `model.dtype`, `output.layout` ...) becomes one flag: its name from the
field's (`--max-retries`, with a few names kept from before: `--model`, `--format`, `--adapter`), its type and
choices from the annotation, its help from the field's description. `job_overrides` maps parsed flags back to
dotted fields, and `flags_markdown` renders the README's table. `python -m jobs.flags` prints that table.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from schemas import JobSpec

# Given as positionals (MANIFEST, OUTPUT) or by the hand-written --storage-option (key=value, nests, merges).
NOT_FLAGS = {"manifest", "output.uri", "storage_options", "output.storage_options"}
# Flag names older than this module, kept so command lines and scripts keep working.
NAMES = {"model.name": "--model", "defaults.output_format": "--format", "model.adapters": "--adapter",
         "reference_roots": "--reference-root", "model.cache_dir": "--model-cache-dir",
         "provenance.enabled": "--provenance"}
# Fields whose value an error never repeats: a PEM pasted where its URL belongs would put a private key in the line.
UNSHOWN = {"provenance.c2pa_key", "provenance.c2pa_certificate"}
METAVARS = {"model.name": "PRESET|HUB_ID|PATH|URL", "model.adapters": "NAME=PATH",
            "gpus_per_replica": "N|auto|TYPE=N,...", "reference_roots": "URL",
            "provenance.c2pa_certificate": "URL", "provenance.c2pa_key": "URL", "provenance.watermark": "TEXT",
            "quality.clip": "PRESET|HUB_ID|PATH|URL", "quality.aesthetic": "PATH|URL"}


@dataclass(frozen=True)
class JobFlag:
    """One command-line flag of a JobSpec field."""

    field: str  # dotted path in JobSpec: "model.dtype"
    names: tuple[str, ...]  # a bool has two: ("--compile", "--no-compile")
    kind: str  # int, float, str, bool, choice, number-or-auto, number-auto-or-per-type, mapping, list
    help: str
    default: Any
    choices: tuple[str, ...] = ()
    bounds: tuple[float | None, float | None] = (None, None)

    @property
    def dest(self) -> str:
        return self.field  # argparse keeps dotted names as given: getattr(args, "model.dtype")


def job_leaf_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of the spec by dotted path (nested spec models flattened) -> its pydantic FieldInfo."""
    leaves: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            leaves.update(job_leaf_fields(annotation, f"{prefix}{name}."))
        else:
            leaves[f"{prefix}{name}"] = info
    return leaves


def _flag(field: str, info: Any) -> JobFlag:
    members = [m for m in _members(info.annotation) if m is not type(None)]
    literals = tuple(str(v) for m in members if typing.get_origin(m) is typing.Literal for v in typing.get_args(m))
    others = [m for m in members if typing.get_origin(m) is not typing.Literal]
    enums = [m for m in others if isinstance(m, type) and issubclass(m, enum.Enum)]
    name = NAMES.get(field, "--" + field.rsplit(".", 1)[-1].replace("_", "-"))
    default = None if info.default is PydanticUndefined else info.default
    if default is not None and info.default_factory is not None:
        raise TypeError(f"{field}: a flag needs a plain default")
    bounds = (_bound(info, "ge", "gt"), _bound(info, "le", "lt"))
    if others == [bool]:
        return JobFlag(field, (name, "--no-" + name[2:]), "bool", info.description or "", default)
    if enums:
        return JobFlag(field, (name,), "choice", info.description or "", default,
                       tuple(str(m.value) for m in enums[0]))
    if literals and not others:
        return JobFlag(field, (name,), "choice", info.description or "", default, literals)
    if literals and others == [float]:
        return JobFlag(field, (name,), "number-or-auto", info.description or "", default, literals, bounds)
    if literals and others[:1] == [float] and len(others) == 2 and typing.get_origin(others[1]) is dict:
        # gpus_per_replica: a number, auto, or TYPE=N,TYPE=N (one per card type), which the spec itself parses
        return JobFlag(field, (name,), "number-auto-or-per-type", info.description or "", default, literals,
                       bounds)
    if len(others) == 1 and others[0] in (int, float, str):
        return JobFlag(field, (name,), others[0].__name__, info.description or "", default, (), bounds)
    if len(others) == 1 and typing.get_origin(others[0]) is dict:
        return JobFlag(field, (name,), "mapping", info.description or "", None)
    if len(others) == 1 and typing.get_origin(others[0]) is list and typing.get_args(others[0]) == (str,):
        return JobFlag(field, (name,), "list", info.description or "", None)  # repeated: one item each
    raise TypeError(f"JobSpec field {field} ({info.annotation}) has no flag type; teach jobs/flags.py _flag")


def _members(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _bound(info: Any, *names: str) -> float | None:
    for item in info.metadata:
        for name in names:
            if getattr(item, name, None) is not None:
                return getattr(item, name)
    return None


# In --help and the README: what to render first, where to write last.
SECTIONS = ("model", "defaults", "", "output", "provenance", "quality")
JOB_FLAGS: tuple[JobFlag, ...] = tuple(sorted(
    (_flag(f, i) for f, i in job_leaf_fields().items() if f not in NOT_FLAGS),
    key=lambda flag: SECTIONS.index(flag.field.split(".")[0] if "." in flag.field else "")))
_taken = [n for flag in JOB_FLAGS for n in flag.names]
assert len(_taken) == len(set(_taken)), f"two JobSpec fields make the same flag: {sorted(_taken)}"


def add_job_flags(parser: argparse.ArgumentParser, prefixes: tuple[str, ...] = ("",)) -> None:
    """Add the flags of the JobSpec fields under `prefixes` ("" for all), grouped as the job file nests them."""
    groups: dict[str, Any] = {}
    for flag in JOB_FLAGS:
        if not flag.field.startswith(prefixes):
            continue
        section = flag.field.split(".")[0] if "." in flag.field else ""
        if section not in groups:
            title = f"job file: {section}.*" if section else "job file: top level"
            doc = (getattr(JobSpec.model_fields[section].annotation, "__doc__", "") or "") if section else ""
            groups[section] = parser.add_argument_group(title, doc.strip().splitlines()[0] if doc else None)
        _add(groups[section], flag)


def _add(group: Any, flag: JobFlag) -> None:
    options: dict[str, Any] = {"dest": flag.dest, "default": None, "help": _help(flag)}
    if flag.kind == "bool":
        group.add_argument(flag.names[0], action=argparse.BooleanOptionalAction, **options)
        return
    if flag.kind == "choice":  # argparse shows the choices as the metavar: {png,jpeg,webp}
        group.add_argument(flag.names[0], choices=flag.choices, **options)
        return
    if flag.kind == "mapping":
        options.update(action="append", type=_key_value(flag.names[0]))
    elif flag.kind == "list":
        options.update(action="append", type=str)
    elif flag.kind in ("number-or-auto", "number-auto-or-per-type"):
        options.update(type=_number_or(flag.choices, per_type=flag.kind == "number-auto-or-per-type"))
    else:
        options.update(type={"int": int, "float": float, "str": str}[flag.kind])
    metavar = {"int": "N", "float": "NUMBER"}.get(flag.kind, flag.field.rsplit(".", 1)[-1].upper())
    group.add_argument(flag.names[0], metavar=METAVARS.get(flag.field, metavar), **options)


def _help(flag: JobFlag) -> str:
    shown = _default_text(flag)
    # argparse formats help with %: a literal percent in a description must be doubled.
    text = flag.help.replace("%", "%%") + (" (repeatable)" if flag.kind in ("mapping", "list") else "")
    return f"{text} (default {shown})" if shown and flag.kind != "bool" else text


def _default_text(flag: JobFlag) -> str:
    value = flag.default
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "on" if value else "off"
    return _number_text(value) if isinstance(value, float) else "" if value is None else str(value)


def _number_text(value: float | None) -> str:
    return "" if value is None else str(int(value)) if float(value).is_integer() else str(value)


def _key_value(name: str) -> Any:
    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key or "." in key:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE with a NAME without dots")
        return key, value

    parse.__name__ = name  # argparse names the flag's type in its error message
    return parse


def _number_or(words: tuple[str, ...], per_type: bool = False) -> Any:
    def parse(text: str) -> float | str:
        if text in words or (per_type and "=" in text):
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or {' or '.join(map(repr, words))}, got {text!r}") \
                from None

    return parse


def job_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted JobSpec fields the user set by flag (None: not given), for `schemas.overrides.apply_overrides`."""
    overrides: dict[str, Any] = {}
    for flag in JOB_FLAGS:
        value = getattr(args, flag.dest, None)
        if flag.kind == "mapping":  # one key each, so NAME=PATH flags add to the job file's mapping
            overrides.update({f"{flag.field}.{key}": item for key, item in value or []})
        else:
            overrides[flag.field] = value
    return overrides


def flags_as_typed(args: argparse.Namespace) -> dict[str, str]:
    """Each field set by flag -> the flag as the user typed it (`--replicas 0`), to name it in errors."""
    typed: dict[str, str] = {}
    for flag in JOB_FLAGS:
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if flag.kind == "bool":
            typed[flag.field] = flag.names[0] if value else "--no-" + flag.names[0][2:]
        elif flag.kind == "mapping":
            typed.update({f"{flag.field}.{k}": f"{flag.names[0]} {k}={v}" for k, v in value})
        elif flag.kind == "list":
            typed[flag.field] = " ".join(f"{flag.names[0]} {item}" for item in value)
        elif flag.field in UNSHOWN:
            typed[flag.field] = flag.names[0]
        else:
            typed[flag.field] = f"{flag.names[0]} {value}"
    return typed


def flags_markdown() -> str:
    """The README's table of the flags and the job-file fields they set."""
    rows = ["| flag | job file | value | default | what it does |", "| --- | --- | --- | --- | --- |"]
    for flag in JOB_FLAGS:
        names = " / ".join(f"`{n}`" for n in flag.names)
        value = {"bool": "switch", "mapping": f"`{METAVARS.get(flag.field, 'KEY=VALUE')}`, repeatable",
                 "list": f"`{METAVARS.get(flag.field, 'VALUE')}`, repeatable",
                 "choice": " \\| ".join(flag.choices), "str": "text", "int": "integer", "float": "number",
                 "number-or-auto": "number \\| " + " \\| ".join(flag.choices),
                 "number-auto-or-per-type": "number \\| " + " \\| ".join(flag.choices) + " \\| TYPE=N,..."
                 }[flag.kind]
        low, high = (_number_text(bound) for bound in flag.bounds)
        if low or high:
            value += f", {low or ''}..{high or ''}"
        default = _default_text(flag)
        rows.append(f"| {names} | `{flag.field}` | {value} | {default} | {flag.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
