"""Install, check and remove keyward's netfilter chains with the iptables binaries.

Only keyward's own chains and their jumps from OUTPUT are touched, so rules another tool put in
the namespace (Docker's embedded DNS, a CNI) survive. Each change is one `iptables-restore
--noflush` transaction per family: the chains are never half filled, and applying twice leaves
the same rules (stale jumps are deleted in the same transaction that inserts the new one).

Only the nf_tables backend is accepted: rules written with iptables-legacy next to nft-backed
rules of the engine or image are evaluated in an order nobody reads in one listing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from gateway.errors import NetfilterError
from gateway.netfilter.rules import CHAINS, FAMILIES, Table, parse, to_restore

log = logging.getLogger("keyward.netfilter")

TIMEOUT = 30.0


def _tool(family: int, suffix: str = "") -> str:
    return ("iptables" if family == 4 else "ip6tables") + suffix


def _argv(argv: Sequence[str], netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def _run(argv: Sequence[str], netns: str | None, stdin: str | None = None) -> str:
    full = _argv(argv, netns)
    if shutil.which(full[0]) is None:
        raise NetfilterError(f"{full[0]} not found: install iptables (nf_tables backend)")
    try:
        proc = subprocess.run(
            full, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetfilterError(f"{' '.join(argv)} timed out after {TIMEOUT:.0f} s") from None
    except FileNotFoundError as e:
        raise NetfilterError(f"{e.filename} not found: install iptables (nf_tables)") from None
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split())[:400]
        raise NetfilterError(f"{' '.join(argv)} failed: {err}")
    return proc.stdout


def check_backend(family: int = 4, netns: str | None = None) -> None:
    """Refuse iptables-legacy (and a missing binary) with one clear line."""
    version = _run([_tool(family), "-V"], netns).strip()
    if "nf_tables" not in version:
        raise NetfilterError(
            f"{version or _tool(family)}: keyward needs the nf_tables backend, not legacy "
            f"(use {_tool(family)}-nft or update-alternatives --set {_tool(family)} ...-nft)"
        )


def _families(rendered: Mapping[int, str]) -> list[int]:
    bad = [f for f in rendered if f not in FAMILIES]
    if bad:
        raise NetfilterError(f"unknown address family {bad[0]!r}: use 4 or 6")
    return sorted(rendered)


def ipv6_available() -> bool:
    """False when the kernel runs without IPv6: then there is no IPv6 to fence."""
    return os.path.exists("/proc/sys/net/ipv6")


def _listing(family: int, table: str, netns: str | None) -> list[str]:
    """`iptables -t TABLE -S`, whitespace-normalised."""
    out = _run([_tool(family), "-w", "-t", table, "-S"], netns)
    return [" ".join(line.split()) for line in out.splitlines() if line.strip()]


def _jumps(listing: Sequence[str], chain: str) -> list[str]:
    """Rules of OUTPUT that jump to `chain` (any form, so stray ones are found too)."""
    return [
        line
        for line in listing
        if line.startswith("-A OUTPUT ") and line.split()[-2:] == ["-j", chain]
    ]


def _restore(family: int, text: str, netns: str | None) -> None:
    _run([_tool(family, "-restore"), "-w", "--noflush"], netns, stdin=text)


def apply(rendered: Mapping[int, str], netns: str | None = None) -> None:
    """Install the rendered rules: our chains refilled, exactly one jump first in OUTPUT.

    A family whose rendering lacks a table we own (IPv6 has no nat chain) gets that table's
    chain removed, so the live state depends only on the input, not on what came before.
    """
    for family in _families(rendered):
        if family == 6 and not ipv6_available():
            log.info("kernel without IPv6: no ip6tables rules needed")
            continue
        check_backend(family, netns)
        tabs = parse(rendered[family])
        stale = []
        for t in tabs:
            stale += [(t.name, rule) for rule in _jumps(_listing(family, t.name, netns), t.chain)]
        _restore(family, to_restore(tabs, delete=stale), netns)
        wanted = {t.name for t in tabs}
        _remove_family(family, [tb for tb in CHAINS if tb not in wanted], netns)


def _normalise(rule: str) -> str:
    """iptables prints rules in one canonical form; fold the few spellings that differ."""
    words = rule.split()
    out: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--ctstate" and i + 1 < len(words):
            out += [w, ",".join(sorted(words[i + 1].split(",")))]
            i += 2
            continue
        out.append(w)
        # `-p tcp --dport N` is printed as `-p tcp -m tcp --dport N`
        if w == "-p" and i + 1 < len(words):
            proto = words[i + 1]
            out.append(proto)
            i += 2
            has_match = words[i : i + 2] == ["-m", proto]
            if not has_match and i < len(words) and words[i] in ("--dport", "--sport"):
                out += ["-m", proto]
            continue
        i += 1
    return " ".join(out)


def _diff(label: str, want: Sequence[str], have: Sequence[str]) -> list[str]:
    want_n = [_normalise(r) for r in want]
    have_n = [_normalise(r) for r in have]
    if want_n == have_n:
        return []
    lines = [f"{label}:"]
    lines += [f"- {r}" for r in want_n if r not in have_n]
    lines += [f"+ {r}" for r in have_n if r not in want_n]
    if len(lines) == 1:
        lines.append("  same rules in a different order")
    return lines


def verify(rendered: Mapping[int, str], netns: str | None = None) -> list[str]:
    """Differences between the rendered rules and the live ones; empty means in force.

    `-` lines are rendered but missing, `+` lines are live but not rendered. The jump into each
    chain must exist once and be the first rule of OUTPUT, or earlier rules could bypass it.
    """
    problems: list[str] = []
    for family in _families(rendered):
        if family == 6 and not ipv6_available():
            continue
        check_backend(family, netns)
        tabs: tuple[Table, ...] = parse(rendered[family])
        for t in tabs:
            listing = _listing(family, t.name, netns)
            where = f"{_tool(family)} -t {t.name}"
            if f"-N {t.chain}" not in listing:
                problems.append(f"{where}: chain {t.chain} missing")
                continue
            have = [line for line in listing if line.startswith(f"-A {t.chain} ")]
            problems += _diff(f"{where} {t.chain}", t.rules, have)
            jumps = _jumps(listing, t.chain)
            output = [line for line in listing if line.startswith("-A OUTPUT ")]
            if jumps != [t.jump]:
                problems.append(f"{where} OUTPUT: want one '{t.jump}', found {len(jumps)}")
            elif output[0] != t.jump:
                problems.append(f"{where} OUTPUT: '{t.jump}' is not the first rule")
    return problems


def _remove_family(family: int, tables: Sequence[str], netns: str | None) -> None:
    lines: list[str] = []
    for table in tables:
        chain = CHAINS[table]
        listing = _listing(family, table, netns)
        jumps = _jumps(listing, chain)
        exists = f"-N {chain}" in listing
        if not (jumps or exists):
            continue
        lines.append(f"*{table}")
        lines += ["-D" + rule[2:] for rule in jumps]
        if exists:
            lines += [f"-F {chain}", f"-X {chain}"]
        lines.append("COMMIT")
    if lines:
        _restore(family, "\n".join(lines) + "\n", netns)


def remove(netns: str | None = None) -> None:
    """Delete our jumps and chains in every family and table; nothing there is fine."""
    for family in FAMILIES:
        if family == 6 and not ipv6_available():
            continue
        check_backend(family, netns)
        _remove_family(family, list(CHAINS), netns)
