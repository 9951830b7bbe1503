"""Path normalisation and METHOD glob-path rules cannot be dodged."""

from __future__ import annotations

import pytest

from gateway.policy.paths import normalise_path, parse_path_rule


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("/repos/../repos/a/b", "/repos/a/b"),
        ("//repos///a/b", "/repos/a/b"),
        ("/./repos/a/./b", "/repos/a/b"),
        ("/%72epos/a/b", "/repos/a/b"),
        ("/repos/a%2Fb", "/repos/a%2Fb"),
        ("/a/b?x=1#f", "/a/b"),
        ("/../../etc", "/etc"),
        ("", "/"),
        ("/a/", "/a/"),
    ],
)
def test_normalise(raw: str, norm: str) -> None:
    assert normalise_path(raw) == norm


@pytest.mark.parametrize(
    "path",
    ["/repos/a/b", "/repos/../repos/a/b", "//repos/a/b", "/%72epos/a/b", "/repos/a/b/", "/repos"],
)
def test_delete_repos_cannot_be_dodged(path: str) -> None:
    rule = parse_path_rule("DELETE /repos/**")
    assert rule.matches("DELETE", normalise_path(path))


def test_single_star_stays_in_one_segment() -> None:
    rule = parse_path_rule("PUT /repos/*/*/collaborators/**")
    assert rule.matches("PUT", "/repos/o/r/collaborators/u")
    assert not rule.matches("PUT", "/repos/o/collaborators/u")
    assert not rule.matches("GET", "/repos/o/r/collaborators/u")
    assert parse_path_rule("delete /x").method == "DELETE"
    assert parse_path_rule("/admin/**").matches("POST", "/admin/x")


@pytest.mark.parametrize("bad", ["DELETE", "DELETE repos", "DEL ETE /x", "GET /a/***", "G3T /x"])
def test_bad_rules(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_path_rule(bad)
