"""A typed-config engine: dataclasses whose fields are the keys, read from YAML files and `key=value` strings.

Generic over any dataclass (it knows nothing of slimtune's keys; those are `slimtune.config`): the string literal
below a field is its documentation (`field_docs`), values are checked against the field annotations and converted
only where nothing is lost (`apply_values`), a nested dataclass is a section whose keys are written
`section.key=value` (or nested in YAML), dict-valued keys merge key by key, and an unknown key is an error that
suggests the closest valid one. `help_text` lists the keys with their types, defaults and documentation.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from slimtune.errors import SlimtuneError


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
        raise SlimtuneError(f"{key}={value!r} is not one of {', '.join(choices)}.{did_you_mean}")


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` (its bases' fields included) to the string literal written right below it
    in the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    source = textwrap.dedent(inspect.getsource(cls))
    class_node = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    body = class_node.body
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = " (or empty)" if type(None) in typing.get_args(tp) else ""
        return " or ".join(_type_name(a) for a in args) + optional
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check `value` against annotation `tp`; convert only where no information is lost (int → float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(key, value, inner[0], source)
        for option in inner:  # e.g. data: one path, or a list of them; the first type that takes the value wins
            try:
                return _coerce(key, value, option, source)
            except SlimtuneError:
                continue
        raise SlimtuneError(f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}). "
                            f"Run `slimtune train --help` to see every key with its type.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "6e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. resume=000200 or a numeric path component
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise SlimtuneError(
        f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}). "
        f"Run `slimtune train --help` to see every key with its type."
    )


def _unknown_key(key: str, cls: type, prefix: str, source: str, extra: tuple[str, ...] = ()) -> SlimtuneError:
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    valid = [prefix + f.name for f in fields] + list(extra)
    hints = _resolved_types(cls)
    # At the top level, a section's key given without its section (report_to for log.report_to) is found as well.
    in_sections = [] if prefix else [f"{f.name}.{g.name}" for f in fields if dataclasses.is_dataclass(hints[f.name])
                                     for g in dataclasses.fields(hints[f.name])]
    hint = [k for k in in_sections if k.endswith("." + key)][:1] or difflib.get_close_matches(
        prefix + key, valid + in_sections, n=1, cutoff=0.5)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    return SlimtuneError(
        f"{source}: unknown config key {prefix + key!r}.{did_you_mean} Run `slimtune train --help` for all keys."
    )


def apply_values(values: dict[str, Any], cls: type, current: dict[str, Any], prefix: str, source: str,
                 given: dict[str, str] | None = None, plugins: dict[str, dict] | None = None,
                 plugin_types: dict[str, type] | None = None) -> None:
    """Merge the nested mapping `values` into `current` (a dict of field values of `cls`), checking each key.
    `given` collects the dotted keys set (with their source); `plugins` holds the values of plug-in sections
    (top level only), keyed by plug-in name, and `plugin_types` their dataclasses."""
    names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = _resolved_types(cls)
    plugin_types = (plugin_types or {}) if plugins is not None else {}
    for key, value in values.items():
        key = str(key)
        if key in plugin_types and key not in names:
            if not isinstance(value, dict):
                raise SlimtuneError(f"{source}: {key} is a section; give its keys as {key}.KEY=VALUE")
            apply_values(value, plugin_types[key], plugins.setdefault(key, default_values(plugin_types[key])),
                         key + ".", source, given)
            continue
        if key not in names:
            raise _unknown_key(key, cls, prefix, source, tuple(plugin_types))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise SlimtuneError(f"{source}: {prefix + key} is a section; give its keys as {prefix + key}.KEY=VALUE")
            apply_values(value, tp, current[key], prefix + key + ".", source, given)
            continue
        coerced = _coerce(prefix + key, value, tp, source)
        if isinstance(coerced, dict) and isinstance(current.get(key), dict):
            current[key] = {**current[key], **coerced}  # column_map.a=x then column_map.b=y keeps both
        else:
            current[key] = coerced
        if given is not None:
            given[prefix + key] = source


def default_values(cls: type) -> dict[str, Any]:
    """The default of every field of `cls`, a section's as a nested dict (what `apply_values` merges into)."""
    out: dict[str, Any] = {}
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = default_values(hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def build(cls: type, values: dict[str, Any]):
    """A `cls` instance from `default_values`-shaped nested dicts (each section's checks run as it is made)."""
    hints = _resolved_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = values[f.name]
        kwargs[f.name] = build(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else v
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value parsed as a YAML scalar: 3 → int, 1e-3 → float, true → bool)."""
    if "=" not in text:
        raise SlimtuneError(f"expected key=value, got {text!r} (e.g. batch_size=16 or badam.switch_mode=ascending)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise SlimtuneError(f"empty key in {text!r}")
    if raw == "":
        value: Any = None
    else:
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value != raw:
            value = raw
        if value is None and raw.lower() not in ("null", "none", "~"):
            value = raw
    return key.split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from `path`, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise SlimtuneError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise SlimtuneError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SlimtuneError(f"{path}: a config file must be a mapping of key: value, got {type(data).__name__}")
    return data


def plain(value):
    """A section (a dataclass instance) as nested dicts; any other value as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def help_text(cls: type, prefix: str = "") -> str:
    """One line per key: name, type, default, docstring — the body of `slimtune train --help`."""
    lines = []
    hints = _resolved_types(cls)
    docs = field_docs(cls)
    defaults = default_values(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append("")
            lines.append(f"  [{prefix}{f.name}] {docs.get(f.name, '')}")
            lines.append(help_text(tp, prefix + f.name + "."))
            continue
        default = defaults[f.name]
        shown = "(empty)" if default in (None, "", []) else repr(default) if isinstance(default, str) else default
        lines.append(f"  {prefix}{f.name}  ({_type_name(tp)}, default {shown})")
        lines.append(textwrap.fill(docs.get(f.name, ""), width=110, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
