"""YAML settings read field by field, errors naming file and field; a leaf so the CA, mesh and serve settings share it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A settings file is unreadable or invalid; the message names the file, the field path and why."""

    def __init__(self, path: Path | str, field: str, reason: str) -> None:
        self.path = str(path)
        self.field = field
        self.reason = reason
        location = f"{self.path}: {field}: " if field else f"{self.path}: "
        super().__init__(location + reason)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: object) -> timedelta:
    """'90s', '5m', '1h', '30d', '500ms' or a number of seconds (also as text: '90', from a command line)."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a duration")
    if isinstance(text, (int, float)):
        return timedelta(seconds=text)
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration like '90s', '5m', '1h', '30d' or a number of seconds")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2) or "s"])


class FieldReader:
    """Typed access to a YAML mapping that reports the dotted path of any bad field."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix

    def error(self, key: str, reason: str) -> ConfigError:
        field = f"{self.prefix}{key}" if key else self.prefix.rstrip(".")
        return ConfigError(self.path, field, reason)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
            names = " or ".join(t.__name__ for t in _as_tuple(kind))
            raise self.error(key, f"must be {names}, got {type(value).__name__}")
        return value

    def file(self, key: str, required: bool = True) -> Path | None:
        value = self.get(key, str, ... if required else None)
        if value is None:
            return None
        resolved = (self.path.parent / value).resolve()
        if not resolved.exists():
            raise self.error(key, f"file {str(resolved)!r} does not exist")
        return resolved

    def duration(self, key: str, required: bool = True) -> timedelta | None:
        value = self.get(key, (str, int, float), ... if required else None)
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as error:
            raise self.error(key, str(error)) from None

    def child(self, key: str, value: Mapping[str, Any]) -> FieldReader:
        return FieldReader(self.path, value, f"{self.prefix}{key}.")

    def check_known(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                raise self.error(str(key), f"unknown field (known: {', '.join(sorted(known))})")


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def parse_host_port(text: object) -> tuple[str, int]:
    """'host:port' (IPv6 in brackets) with a port in 1..65535; ValueError says why not."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not host:port")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


# libyaml's parser when PyYAML was built with it (the wheels are): a 1,000-service mesh file parses in
# ~0.1 s instead of ~1 s, which was most of the time from a file edit to the push.
_SafeLoaderBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoaderBase):  # type: ignore[misc,valid-type]
    """A safe loader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_line(error: yaml.YAMLError) -> str:
    """One line for a YAML error: where, what, and in which construct; ConfigError names the file (str(error)
    would say `<unicode string>` over several lines)."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return f"invalid YAML: {' '.join(str(error).split())}"
    where = ""
    if error.problem_mark is not None:
        where = f" at line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1}"
    text = f"invalid YAML{where}: {error.problem or error.context or 'cannot parse'}"
    if error.context and error.problem:
        text += f" ({error.context}"
        if error.context_mark is not None:
            text += f" at line {error.context_mark.line + 1}, column {error.context_mark.column + 1}"
        text += ")"
    return " ".join(text.split())


def read_yaml_mapping(path: Path) -> Mapping[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(path, "", f"cannot read: {error.strerror}") from None
    return parse_yaml_mapping(path, raw)


def parse_yaml_mapping(path: Path, raw: bytes) -> Mapping[str, Any]:
    """`raw` parsed as `read_yaml_mapping` parses a file's bytes; `path` names where they came from in errors
    (e.g. the etcd key a stored mesh config was read from)."""
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as error:
        raise ConfigError(path, "", f"not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(path, "", _yaml_error_line(error)) from None
    if not isinstance(data, Mapping):
        raise ConfigError(path, "", "must be a YAML mapping")
    return data
