"""ril_fast.settings on a root other than Config: errors name that root's keys, check_value is applied; empty
files, int and optional values, spaced and dotted keys, sections set in code, ``show``."""

from dataclasses import dataclass, field

import pytest

from ril_fast.settings import ConfigError, check_types, load, opt, show


@dataclass
class Inner:
    """A section."""

    rate: float = opt(0.5, "a rate")


@dataclass
class Root:
    """A small root."""

    name: str = opt("x", "a name")
    inner: Inner = field(default_factory=Inner, metadata={"help": "a section"})


def test_unknown_key_lists_the_root_s_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown config key 'steps'; valid keys: name, inner\.rate$"):
        load(Root, ["steps=3"])
    (tmp_path / "c.yaml").write_text("name: a\ninner:\n  nope: 1\n")
    with pytest.raises(ConfigError, match=r":3: unknown config key 'inner\.nope'; valid keys: name, inner\.rate$"):
        load(Root, ["--config", str(tmp_path / "c.yaml")])


def test_check_value_and_typed_parse():
    assert load(Root, ["inner.rate=2", "name=b"]) == Root("b", Inner(2.0))
    with pytest.raises(ConfigError, match=r"^name: no b$"):
        load(Root, ["name=b"], check_value=lambda key, value: "no b" if value == "b" else None)


@dataclass
class Counted:
    """A root with an int, an optional int and a section, that checks the types of values set in code."""

    count: int = opt(1, "a count")
    limit: int | None = opt(None, "a limit, or none")
    inner: Inner = field(default_factory=Inner, metadata={"help": "a section"})

    def __post_init__(self):
        check_types(self)


def test_an_empty_or_comment_only_yaml_file_keeps_the_defaults(tmp_path):
    """A file with no mapping at all (empty, or comments only) sets nothing, rather than being "not a mapping"."""
    for text in ("", "# nothing set yet\n"):
        (tmp_path / "c.yaml").write_text(text)
        assert load(Root, ["--config", str(tmp_path / "c.yaml"), "name=y"]) == Root("y")


def test_a_yaml_float_is_no_int_and_none_has_its_spellings(tmp_path):
    """YAML reads 2.5 as a float: an int key refuses it (never truncated to 2), naming the file's line; an optional
    key takes none, null, ~ (any case) as None from the command line."""
    (tmp_path / "c.yaml").write_text("limit: 3\ncount: 2.5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: count: cannot use 2\.5: expected int \(an integer\)$"):
        load(Counted, ["--config", str(tmp_path / "c.yaml")])
    for text in ("none", "None", "null", "NULL", "~", " none "):
        assert load(Counted, ["limit=4", f"limit={text}"]).limit is None
    assert load(Counted, ["limit=4", "count=2"]) == Counted(2, 4)


def test_keys_spaced_on_the_command_line_and_dotted_unknown_sections(tmp_path):
    """Spaces around a command-line key are dropped ("name =b"); a dotted YAML key whose head is no field at all
    ("nope.rate") is an unknown key, like one whose head is no section."""
    assert load(Root, ["name =b", " inner.rate= 2"]) == Root("b", Inner(2.0))
    (tmp_path / "c.yaml").write_text("name: a\nnope.rate: 1\n")
    with pytest.raises(ConfigError, match=r":2: unknown config key 'nope\.rate'; valid keys: name, inner\.rate$"):
        load(Root, ["--config", str(tmp_path / "c.yaml")])


def test_a_section_set_in_code_must_be_its_dataclass():
    """``check_types`` refuses a section given as another value in code (``Counted(inner=3)``)."""
    with pytest.raises(ConfigError, match=r"^inner must be a Inner section, got 3$"):
        Counted(inner=3)


def test_show_writes_values_as_the_command_line_does():
    """An empty string and an empty list are "(empty)"; None is "none"; a list is comma-joined."""
    assert [show(v) for v in ("", [], None, ["a", "b"], 0.5, False)] == ["(empty)", "(empty)", "none", "a,b", "0.5",
                                                                         "False"]
