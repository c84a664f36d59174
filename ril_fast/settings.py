"""Typed settings: nested dataclasses <- YAML files + ``key=value`` overrides, errors naming file:line.

A root dataclass declares every setting once (:func:`opt`: its default and help); a field whose type is a
dataclass is a section, its fields' keys dotted (``optim.lr``). :func:`load` reads ``[--config FILE.yaml]
[key=value ...]`` into it: the defaults < the YAML files (in order) < the overrides (left to right). Values are
converted by the fields' type hints, never evaluated; a repeated YAML key, an unknown key or an
unparsable value is a :class:`ConfigError` naming the key and what is valid (in a YAML file, at which line), and a
value check of the root's ``__post_init__`` that fails says where each key it names was set. The caller's
``check_value(key, value) -> problem or None`` rejects a parsed value the type allows but the setting does not.
"""

from __future__ import annotations

import enum
import re
import typing
from collections.abc import Callable, Hashable
from dataclasses import asdict, field, fields, is_dataclass

import yaml

CheckValue = Callable[[str, object], str | None]  # (dotted key, parsed value) -> its problem, or None


class ConfigError(ValueError):
    """A bad config file, override or value; the message says which key and what is valid. ``key``: the dotted key
    at fault, where one is; ``problems``: each value check that failed (the root's ``__post_init__``), in the
    message."""

    def __init__(self, message: str, *, key: str | None = None, problems: list[str] | None = None):
        super().__init__(message)
        self.key, self.problems = key, problems or []


def opt(default, doc: str):
    """A dataclass field with its default (lists are copied per instance) and its help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": doc})
    return field(default=default, metadata={"help": doc})


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
def load(root: type, argv: list[str], *, check_value: CheckValue | None = None):
    """Parse ``[--config FILE.yaml] [key=value ...]`` into a ``root`` (its ``__post_init__`` checks the values):
    the overrides apply after every file, whatever the order. ``check_value(key, parsed value)``: what is wrong
    with a value set in a file or an override, or None. A ``ConfigError`` with ``problems`` from the root is
    raised again with where each key a problem names was set (``at FILE:LINE``, ``on the command line``)."""
    argv = list(argv)
    values: dict[str, object] = {}
    where: dict[str, str] = {}  # dotted key -> where its value was set ("at FILE:LINE", "on the command line")
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a YAML file")
                i += 1
                path = argv[i]
            else:
                path = arg.split("=", 1)[1]
            from_file, lines = _read_yaml(path, root, check_value)
            values.update(from_file)
            where.update({key: f"at {path}:{lines[key]}" if key in lines else f"in {path}" for key in from_file})
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"cannot read argument {arg!r}: expected --config FILE.yaml or key=value "
                              f"(valid keys: {', '.join(valid_keys(root))})")
        i += 1
    for arg in overrides:  # after every --config, whatever the order on the command line
        key, text = arg.split("=", 1)
        values[key.strip()] = _parse(root, key.strip(), text, check_value)
        where[key.strip()] = "on the command line"
    try:
        return _build(root, values)
    except ConfigError as e:
        if not e.problems:
            raise
        sourced = [_sourced(p, where) for p in e.problems]
        raise ConfigError("invalid config:\n  " + "\n  ".join(sourced), problems=sourced) from None


def _sourced(problem: str, where: dict[str, str]) -> str:
    """``problem`` followed by where each key it names was set (``load``'s ``where``)."""
    words = re.findall(r"[A-Za-z_][\w.]*(?![\w.'])", problem)  # not "the student's"
    keys = [k for k in dict.fromkeys(words) if k in where]
    if len(keys) == 1:
        return f"{problem} (set {where[keys[0]]})"
    return f"{problem} ({'; '.join(f'{k} set {where[k]}' for k in keys)})" if keys else problem


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        """A mapping's dict; a repeated key is a ConfigError naming the file, the key and both lines."""
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base`` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # SafeLoader's own error follows
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"{key_node.start_mark.name}:{line}: key {key!r} is repeated (first on line "
                                  f"{lines[key]}); YAML would keep only the last value")
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str, root: type, check_value: CheckValue | None) -> tuple[dict, dict]:
    """The flat {dotted key: parsed value} of a YAML config file for ``root``, and {dotted key: its line}; a key
    repeated in it is an error, and an error in a key or value names the file and the key's line. The bytes go to
    YAML, which reads UTF-8 or, after a byte-order mark, UTF-16 (other bytes: an error naming where)."""
    try:
        with open(path, "rb") as f:
            loader = _UniqueKeyLoader(f)
            try:
                node = loader.get_single_node()
                data = loader.construct_document(node) if node is not None else None
            finally:
                loader.dispose()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values, got {type(data).__name__}")
    lines = _key_lines(node)
    try:
        flat = _flatten_input(data, root, "", root)
        return {k: _parse(root, k, v, check_value) for k, v in flat.items()}, lines
    except ConfigError as e:
        at = f"{path}:{lines[e.key]}" if e.key in lines else path
        raise ConfigError(f"{at}: {e}", key=e.key) from None


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """{dotted key: 1-based line} of a composed YAML mapping (its nested mappings' keys dotted)."""
    lines = {}
    for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else []:
        if isinstance(key_node, yaml.ScalarNode):
            key = prefix + str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of dataclass ``cls``, in declaration order."""
    keys = []
    for f in fields(cls):
        tp = _hints(cls)[f.name]
        if is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def help_text(root: type, doc: str) -> str:
    """``doc``, then every key of ``root`` with its default, type and help, for ``--help``."""
    default = flatten(plain(asdict(root())))
    lines = [doc.strip(), "", "keys:"]
    for key in valid_keys(root):
        cls, name = _owner(root, key)
        f = next(f for f in fields(cls) if f.name == name)
        lines.append(f"  {key} = {show(default[key])}  [{_type_name(_hints(cls)[name])}]")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Typed parsing (no eval): the field's annotation decides
# ----------------------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~"}


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unknown(root: type, key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(root))}", key=key)


def _owner(root: type, key: str):
    """The dataclass under ``root`` that holds dotted ``key`` and the field's name in it."""
    *sections, name = key.split(".")
    cls = root
    for s in sections:
        tp = _hints(cls).get(s)
        if not is_dataclass(tp):
            raise _unknown(root, key)
        cls = tp
    tp = _hints(cls).get(name)
    if tp is None:
        raise _unknown(root, key)
    if is_dataclass(tp):
        raise ConfigError(f"{key!r} is a section; set its fields: "
                          f"{', '.join(valid_keys(tp, key + '.'))}", key=key)
    return cls, name


def _optional_inner(tp):
    """X for ``X | None``, else None."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return None


def _type_name(tp) -> str:
    inner = _optional_inner(tp)
    if inner is not None:
        return f"{_type_name(inner)} or none"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return " | ".join(m.value for m in tp)
    if typing.get_origin(tp) is list:
        return "comma-separated list"
    return tp.__name__


def _parse(root: type, key: str, value, check_value: CheckValue | None):
    """``value`` (a command-line string, or a YAML scalar or list) converted to the type of ``key`` under
    ``root``; a value ``check_value`` finds a problem with is an error."""
    owner, name = _owner(root, key)
    tp = _hints(owner)[name]
    try:
        parsed = _convert(value, tp, strict=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: cannot use {value!r}: expected {_type_name(tp)} ({e})", key=key) from None
    if check_value is not None and (problem := check_value(key, parsed)):
        raise ConfigError(f"{key}: {problem}", key=key)
    return parsed


def _convert(value, tp, *, strict: bool):
    """``value`` as type ``tp``. Not strict (command line, YAML): strings are parsed by the type (YAML
    reads 1e-3, having no dot, as a string). Strict (values set in code): only enums parse strings."""
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None or (not strict and isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return _convert(value, inner, strict=strict)
    if typing.get_origin(tp) is list:
        if isinstance(value, str) and not strict:
            return [s.strip() for s in value.split(",") if s.strip()]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise TypeError("a list of strings")
    if value is None:
        raise TypeError("none is not allowed here")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value.strip().lower() if isinstance(value, str) else value)
        except ValueError:
            raise ValueError(f"one of {[m.value for m in tp]}") from None
    if tp is str:
        if not isinstance(value, str):
            raise TypeError("a string (quote it in YAML)")
        return value
    if isinstance(value, str) and not strict:
        text = value.strip()
        if tp is bool:
            if text.lower() not in _TRUE | _FALSE:
                raise ValueError("true or false")
            return text.lower() in _TRUE
        return tp(text)  # int("2.5") and float("x") raise ValueError
    if tp is bool and isinstance(value, bool):
        return value
    if tp in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if tp is int and not isinstance(value, int):
            raise TypeError("an integer")
        return tp(value)
    raise TypeError(f"a {tp.__name__}")


def check_types(obj, prefix: str = "") -> None:
    """Reject values of the wrong type set in code (``Config(steps="5")``); enums may be given by value (converted
    in place). For a root dataclass's ``__post_init__``; ``prefix``: the dotted section of ``obj``."""
    for f in fields(obj):
        tp, value = _hints(type(obj))[f.name], getattr(obj, f.name)
        if is_dataclass(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{prefix}{f.name} must be a {tp.__name__} section, got {value!r}")
            check_types(value, f"{prefix}{f.name}.")
            continue
        try:
            object.__setattr__(obj, f.name, _convert(value, tp, strict=True))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{prefix}{f.name}: cannot use {value!r}: expected {_type_name(tp)} ({e})") from None


def _build(cls, flat: dict):
    """``cls`` from its defaults with the parsed dotted values of ``flat`` applied."""
    sections: dict[str, dict] = {}
    top = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if rest:
            sections.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    for name, sub in sections.items():
        tp = _hints(cls)[name]
        top[name] = _build(tp, sub)
    return cls(**top)


def from_nested(root: type, data: dict, *, check_value: CheckValue | None = None):
    """A ``root`` from nested (YAML-style) data over its defaults; unknown keys, unparsable values and values
    ``check_value`` finds a problem with are errors."""
    flat = _flatten_input(data, root, "", root)
    return _build(root, {k: _parse(root, k, v, check_value) for k, v in flat.items()})


def _flatten_input(data: dict, cls, prefix: str, root: type) -> dict:
    """Nested YAML data for section ``cls`` (dotted ``prefix``) of ``root`` -> {dotted key: value}, checking that
    sections are mappings. A dotted key (``optim.lr:``, as the command line spells it) is its section's field;
    given both so and in its section, it is an error."""
    flat = {}
    hints = _hints(cls)
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(name, str) and "." in name:
            head, rest = name.split(".", 1)
            if not is_dataclass(hints.get(head)):
                raise _unknown(root, key)
            found = _flatten_input({rest: value}, hints[head], f"{prefix}{head}.", root)
        elif not isinstance(name, str) or name not in hints:
            raise _unknown(root, key)
        elif is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{key!r} is a section: give it a mapping of "
                                  f"{', '.join(valid_keys(hints[name], key + '.'))}", key=key)
            found = _flatten_input(value, hints[name], key + ".", root)
        else:
            found = {key: value}
        if twice := sorted(found.keys() & flat.keys()):
            raise ConfigError(f"{twice[0]!r} is given twice (dotted, and in its section)", key=twice[0])
        flat.update(found)
    return flat


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------
def plain(value):
    """``value`` (nested dicts and lists, e.g. ``dataclasses.asdict``'s) with each enum as its value."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested dicts -> {dotted key: value}, lists and other values kept whole."""
    flat = {}
    for k, v in data.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat


def show(value) -> str:
    """A plain setting's value as the command line writes it: ``none``, a comma-joined list, ``(empty)``."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(value) if value else "(empty)"
    if value == "":
        return "(empty)"
    return str(value)
