"""What the gateway process does to itself: closed to same-uid processes before it reads a
secret, and (in a pod) dropping root for good once the netfilter rules are in."""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import pkgutil
import pwd
from collections.abc import Collection
from pathlib import Path

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
CAP_LAST = 63


def _prctl(option: int, arg: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def permits(st: os.stat_result, uid: int, gids: Collection[int], bit: int) -> bool:
    """Whether mode bits let `uid` (with groups `gids`) read (4), write (2) or search (1):
    the owner's bits, else the group's, else others'. ACLs are not consulted."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def blocked_ancestors(path: Path, uid: int, gids: Collection[int] = ()) -> list[Path]:
    """The directories above `path` that `uid` cannot search, deepest first."""
    return [d for d in path.resolve().parents if not permits(d.stat(), uid, gids, 0o1)]


def unreachable_ancestor(path: Path, uid: int, gids: Collection[int] = ()) -> Path | None:
    """The first directory above `path` that `uid` cannot traverse, or None. After the drop
    the gateway opens files in its state dir by path: a state dir under a 0700 home (root's,
    with sudo) would fail half-way through start-up."""
    blocked = blocked_ancestors(path, uid, gids)
    return blocked[0] if blocked else None


def readable_by(path: Path, uid: int, gids: Collection[int] = ()) -> bool:
    """Whether a process of `uid` (and `gids`) could open `path` for reading, by mode bits:
    every directory on the way searchable, the file itself readable."""
    real = path.resolve()
    return not blocked_ancestors(real, uid, gids) and permits(real.stat(), uid, gids, 0o4)


def user_groups(uid: int, gid: int | None = None) -> tuple[int, set[int]]:
    """(primary gid, every gid) of `uid`: from the passwd/group files when it has an entry,
    else just `gid` (default: the same number as the uid, as pods use)."""
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        g = uid if gid is None else gid
        return g, {g}
    g = pw.pw_gid if gid is None else gid
    return g, {g, *os.getgrouplist(pw.pw_name, pw.pw_gid)}


def make_undumpable() -> None:
    """Non-dumpable: a process of the same uid (the agent under `keyward run`) can no longer
    read this process's /proc/PID/environ, mem, fd/ or root/, nor ptrace it, and no core dump
    is written. Kept across fork, reset by execve: the agent child starts normal."""
    if _prctl(PR_SET_DUMPABLE, 0) != 0 or _prctl(PR_GET_DUMPABLE, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def chown_tree(path: Path, uid: int, gid: int) -> None:
    """Hand the state dir (CA key, OAuth cache) to the proxy uid before dropping to it."""
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


# Imported lazily by the data planes (codecs on first use, protocol layers on first flow). After
# the drop the interpreter's own files may be unreadable (a Python under /root), so load now.
PRELOAD_MODULES = (
    "encodings.idna",
    "encodings.punycode",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.utf_16",
    "stringprep",
    "unicodedata",
    "concurrent.futures.thread",  # the loop's default executor (getaddrinfo of a TCP listener)
)
PRELOAD_PACKAGES = ("mitmproxy.proxy", "mitmproxy.net", "mitmproxy.utils", "h2", "h11", "wsproto")


def preload_modules() -> None:
    for name in PRELOAD_MODULES:
        importlib.import_module(name)
    for package in PRELOAD_PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            with contextlib.suppress(Exception):
                importlib.import_module(info.name)


def drop_to(uid: int, gid: int) -> None:
    """Empty the bounding set, switch uid/gid, forbid regaining privileges. Irreversible."""
    preload_modules()
    for cap in range(CAP_LAST + 1):
        _prctl(PR_CAPBSET_DROP, cap)  # fails (EINVAL) past the kernel's last cap: harmless
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    caps = capabilities()
    if any(caps[k] for k in ("CapEff", "CapPrm")):
        raise PermissionError(f"capabilities remain after dropping privileges: {caps}")


def capabilities() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap"):
            out[key] = int(value.strip(), 16)
    return out
