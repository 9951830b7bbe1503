"""Path canonicalisation and METHOD glob-path rules cannot be dodged: the canonical form is the
one rules match and (on path-rule hosts) the one sent upstream, and every form some server reads
differently is reported as ambiguous."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.policy.paths import Ambiguity, canonicalise, normalise_path, parse_path_rule

A = Ambiguity


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("/repos/../repos/a/b", "/repos/a/b"),
        ("//repos///a/b", "/repos/a/b"),
        ("/./repos/a/./b", "/repos/a/b"),
        ("/%72epos/a/b", "/repos/a/b"),
        ("/repos/a%2fb", "/repos/a%2Fb"),
        ("/a/b?x=1#f", "/a/b"),
        ("/../../etc", "/etc"),
        ("", "/"),
        ("/a/", "/a/"),
        ("/a/b/..", "/a/"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/.%2e/b/", "/b/"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/café", "/caf%C3%A9"),
        ("/a b", "/a%20b"),
        ("/a\\b", "/a/b"),
    ],
)
def test_normalise(raw: str, norm: str) -> None:
    assert normalise_path(raw) == norm


@pytest.mark.parametrize(
    ("raw", "classes"),
    [
        ("/repos/a%2Fb", {A.ENCODED_SLASH}),
        ("/x/..%2frepos/a", {A.ENCODED_SLASH}),
        ("/repos%5ca", {A.ENCODED_BACKSLASH}),
        ("/repos\\a", {A.BACKSLASH}),
        ("/repos;x=1/a", {A.PATH_PARAMETER}),
        ("/x/..;/repos/a", {A.PATH_PARAMETER}),
        ("/repos%3Bx/a", {A.PATH_PARAMETER}),
        ("/%2572epos/a", {A.DOUBLE_ENCODING}),
        ("/%zz", {A.INVALID_ESCAPE}),
        ("/a%4", {A.INVALID_ESCAPE}),
        ("/a%", {A.INVALID_ESCAPE}),
        ("/%u002e%u002e/repos", {A.INVALID_ESCAPE}),
        ("/%c0%ae%c0%ae/repos", {A.INVALID_ESCAPE}),  # overlong UTF-8 dots
        ("/a%00b", {A.CONTROL}),
        ("/a%0d%0aX: y", {A.CONTROL}),
        ("/a\x00", {A.CONTROL}),
        ("/a\u2028", {A.CONTROL}),
        ("/a#b", {A.FRAGMENT}),
        ("/a?x=1#b", {A.FRAGMENT}),
        ("/a%23b", {A.FRAGMENT}),
        ("/%EF%BD%92epos", {A.UNICODE_LOOKALIKE}),  # fullwidth r
        ("/\u212aey", {A.UNICODE_LOOKALIKE}),  # Kelvin sign
        ("/repo\u017f", {A.UNICODE_LOOKALIKE}),  # long s: upper() is S
        ("repos/a", {A.NOT_ORIGIN_FORM}),
        ("*", {A.NOT_ORIGIN_FORM}),
        ("/repos/a/b", set()),
        ("/caf%C3%A9/x", set()),
        ("/a/%2e%2e/b//c", set()),
        ("/search?q=a%2Fb;c%25", set()),  # the query is not the path
    ],
)
def test_ambiguity_classes(raw: str, classes: set[Ambiguity]) -> None:
    assert set(canonicalise(raw).ambiguities) == classes


def test_query_is_kept_as_sent() -> None:
    c = canonicalise("/a/../b?x=%2F&y=1;z")
    assert (c.path, c.query, c.target) == ("/b", "?x=%2F&y=1;z", "/b?x=%2F&y=1;z")


@pytest.mark.parametrize(
    "path",
    [
        "/repos/a/b",
        "/repos/../repos/a/b",
        "//repos/a/b",
        "/%72epos/a/b",
        "/repos/a/b/",
        "/repos",
        "/Repos/a/b",
        "/REPOS/A",
        "/%52epos/x",
        "/x/%2e%2e/repos/a",
        "/repos\\a",
    ],
)
def test_delete_repos_cannot_be_dodged(path: str) -> None:
    rule = parse_path_rule("DELETE /repos/**")
    assert rule.matches("DELETE", normalise_path(path))
    assert rule.matches("delete", normalise_path(path))


def test_single_star_stays_in_one_segment() -> None:
    rule = parse_path_rule("PUT /repos/*/*/collaborators/**")
    assert rule.matches("PUT", "/repos/o/r/collaborators/u")
    assert rule.matches("PUT", "/Repos/o/r/Collaborators/u")
    assert not rule.matches("PUT", "/repos/o/collaborators/u")
    assert not rule.matches("GET", "/repos/o/r/collaborators/u")
    assert parse_path_rule("delete /x").method == "DELETE"
    assert parse_path_rule("/admin/**").matches("POST", "/admin/x")


@pytest.mark.parametrize("bad", ["DELETE", "DELETE repos", "DEL ETE /x", "GET /a/***", "G3T /x"])
def test_bad_rules(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_path_rule(bad)


# -- properties ---------------------------------------------------------------------------------
# Paths built from the pieces attackers combine; each server model below reads them its own way.
PIECES = ["repos", "Repos", "a", "..", ".", "%2e", "%2E%2e", ".%2e", "%2F", "%2f", "%5C", "\\",
          ";", ";v=1", "%3B", "%25", "%2572", "%72", "%52", "/", "//", "%00", "%", "%c0%af",
          "\uff52", "?", "#", " ", "\t"]  # fmt: skip
paths = st.lists(st.sampled_from(PIECES), max_size=12).map(lambda xs: "/" + "".join(xs))


def _resolve(path: str) -> str:
    out: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    return "/" + "/".join(out)


def server_readings(target: str) -> set[str]:
    """How a range of servers could read a target: 0-2 percent-decodings (Express/Go/Werkzeug,
    a double-decoding stack), \\ as /, ;params dropped (Tomcat/Spring), NUL truncation (C),
    fragment stripped or kept, NFKC folding, case-insensitive routing."""
    import unicodedata

    readings: set[str] = set()
    for frag in (True, False):
        base = target.split("?", 1)[0]
        if frag:
            base = base.split("#", 1)[0]
        for decodes in (0, 1, 2):
            p = base
            for _ in range(decodes):
                p = unquote(p, errors="replace")
            for variant in (p, p.replace("\\", "/")):
                for v in (variant, "/".join(s.split(";", 1)[0] for s in variant.split("/"))):
                    v = unicodedata.normalize("NFKC", v.split("\x00", 1)[0])
                    readings.add(_resolve(v).lower())
    return readings


@settings(max_examples=300, deadline=None)
@given(paths)
@example("/x/..%2Frepos/a")
@example("/x/..;/repos/a")
@example("/%2572epos/a")
@example("/repos/%2E%2e")
def test_no_server_reading_escapes_a_deny_rule(target: str) -> None:
    """An unambiguous target is sent upstream in canonical form: if any server model reads that
    form under /repos, the rule matched it. (Ambiguous targets are refused, never sent.)"""
    rule = parse_path_rule("DELETE /repos/**")
    c = canonicalise(target)
    if c.ambiguities:
        return
    if any(r == "/repos" or r.startswith("/repos/") for r in server_readings(c.target)):
        assert rule.matches("DELETE", c.path), (target, c)


@settings(max_examples=300, deadline=None)
@given(st.one_of(paths, st.text(max_size=40).map(lambda s: "/" + s)))
def test_canonical_form_is_stable_and_plain(target: str) -> None:
    c = canonicalise(target)
    assert c.path.startswith("/") and c.path.isascii()
    assert "//" not in c.path
    assert not any(seg in (".", "..") for seg in c.path.split("/"))
    again = canonicalise(c.path)
    assert again.path == c.path
    # sending the canonical form never makes a clean path ambiguous
    if not c.ambiguities:
        assert not again.ambiguities
    # without ambiguity, decoding what we send once gives no new separators or dot segments
    if not c.ambiguities:
        decoded = unquote(c.path)
        assert decoded.count("/") == c.path.count("/") and "\\" not in decoded
        assert not any(seg in (".", "..") for seg in decoded.split("/"))
