"""A large config (a host list of an organisation's allowed APIs) loads in one parse, without
the cycle collector walking everything it builds; its errors still name their lines."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

import pytest
import yaml

from gateway.config import compile, loader
from gateway.config.compile import build_policy
from gateway.config.loader import ConfigError, parse_config_text
from tests.support.configs import big_config


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """Counts the cycle collector's runs while the test holds it."""
    runs: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            runs.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        yield runs
    finally:
        gc.callbacks.remove(count)


def _load_and_compile(text: str) -> None:
    policy = build_policy(parse_config_text(text, "big.yaml").config)
    assert len(policy.rules) == 20_000
    rule = policy.rule_for("h2.example.test", 443)
    assert rule is not None and rule.headers[0].secrets == ("tok",)
    assert policy.rule_for("x.w1.example.test", 443) is not None


def test_a_large_config_loads_and_compiles_without_cycle_collection(
    collections: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = big_config(20_000)
    _load_and_compile(text)
    # At most the one young-generation collection that follows each paused phase.
    assert len(collections) <= 2, collections
    assert gc.isenabled()
    # The same load with the collector running: this is what the pause saves.
    collections.clear()
    monkeypatch.setattr(loader, "gc_paused", contextlib.nullcontext)
    monkeypatch.setattr(compile, "gc_paused", contextlib.nullcontext)
    _load_and_compile(text)
    assert len(collections) > 20, collections


def test_the_pause_keeps_a_collector_that_was_off_off() -> None:
    gc.disable()
    try:
        parse_config_text(big_config(10), "small.yaml")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_yaml_is_composed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = yaml.CSafeLoader.get_single_node

    def counted(self: yaml.CSafeLoader) -> yaml.Node | None:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(yaml.CSafeLoader, "get_single_node", counted)
    assert loader._Loader is yaml.CSafeLoader  # libyaml is what large configs are read with
    parse_config_text(big_config(1_000), "big.yaml")
    assert calls == [1]


def test_errors_in_a_large_config_still_name_their_lines() -> None:
    text = big_config(2_000).replace("h1000.example.test: {}", "h1000.example.test: {allow: 3}")
    text += "    h5.example.test: {}\n"  # a duplicate of rule 5, on the last line
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, "big.yaml")
    message = str(e.value)
    line_of_1000 = text.splitlines().index("    h1000.example.test: {allow: 3}") + 1
    assert f'big.yaml:{line_of_1000}: egress.hosts."h1000.example.test".allow:' in message
    last = len(text.splitlines())
    assert f'big.yaml:{last}: egress.hosts."h5.example.test": duplicate key' in message, message
