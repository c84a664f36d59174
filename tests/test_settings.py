"""ril_fast.settings on a root other than Config: errors name that root's keys, check_value is applied."""

from dataclasses import dataclass, field

import pytest

from ril_fast.settings import ConfigError, load, opt


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
