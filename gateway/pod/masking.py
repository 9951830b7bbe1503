"""The agent's view of the machine in `keyward run --isolate`: a private mount namespace in
which every file that holds or leads to a secret is masked, and, when the agent runs as a
dedicated uid, the workspace (the current directory) mapped so it stays the agent's to edit.

Run as root between `ip netns exec` and `setpriv`:

    python -m gateway.pod.masking PLAN_JSON -- setpriv --reuid ... CMD

Masks are an empty read-only file or directory bound over the config file, its `.env`, every
`file:` secret source, the state dir and the control socket's dir. The workspace is an
idmapped mount: files the invoking user owns appear owned by the agent uid, and what the agent
creates lands on disk as the invoking user's. Any step that fails stops the agent from
starting (fail closed). Standard library only: this runs before every agent command.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import stat
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import MaskError

if TYPE_CHECKING:
    from gateway.config.loader import LoadedConfig

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MASK_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
# Generic syscall numbers (the same on every architecture for these newer calls).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
OPEN_TREE_CLONE, MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_IDMAP = 0x1, 0x4, 0x00100000


@dataclass(frozen=True)
class Workspace:
    """The directory the agent works in, owned on disk by `owner_uid`/`owner_gid`.
    `reveal` (the user's home, or the highest directory above the workspace the agent uid
    cannot enter) is covered by an empty read-only tmpfs holding only the way down to it."""

    path: str
    owner_uid: int
    owner_gid: int
    reveal: str | None = None


@dataclass(frozen=True)
class MountPlan:
    masks: tuple[str, ...]
    empty_file: str
    empty_dir: str
    agent_uid: int
    agent_gid: int
    workspace: Workspace | None = None
    cwd: str = field(default_factory=os.getcwd)
    # The combined bundle (system roots + keyward CA), bound read-only over each of these system
    # bundle paths that exists: clients that read no trust variable trust the gateway too.
    trust_bundle: str | None = None
    system_bundles: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """The helper's command line; the caller appends `--` and the command to exec."""
        return [sys.executable, "-I", "-m", "gateway.pod.masking", json.dumps(asdict(self))]

    @classmethod
    def from_json(cls, text: str) -> MountPlan:
        data = json.loads(text)
        ws = data.pop("workspace")
        data["masks"] = tuple(data["masks"])
        data["system_bundles"] = tuple(data.get("system_bundles", ()))
        return cls(**data, workspace=Workspace(**ws) if ws else None)


def protected_paths(
    loaded: LoadedConfig, state_dir: Path, control_dir: Path | None = None
) -> list[Path]:
    """What the agent must not see: the config, its `.env`, every `file:` secret source, the
    state dir (CA key, OAuth cache) and the control socket's dir. Existing ones, resolved."""
    from gateway.credentials.sources import secret_files

    candidates = [
        loaded.path,
        loaded.base_dir / ".env",
        *secret_files(loaded.config.secrets, loaded.base_dir).values(),
        state_dir,
    ]
    if control_dir is not None:
        candidates.append(control_dir)
    out: list[Path] = []
    for p in candidates:
        real = Path(p).resolve()
        if real.exists() and real not in out:
            out.append(real)
    return out


def make_mask_sources(directory: Path) -> tuple[Path, Path]:
    """An empty file (0444) and an empty directory (0555), root's, to bind over masked paths."""
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    empty_file, empty_dir = directory / "empty", directory / "empty.d"
    empty_file.write_bytes(b"")
    empty_file.chmod(0o444)
    empty_dir.mkdir(exist_ok=True)
    empty_dir.chmod(0o555)
    return empty_file, empty_dir


# -- the helper (runs as root inside the agent's new mount namespace) ------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise MaskError(err, f"{what}: {os.strerror(err)}")
    return rc


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    def enc(s: str | None) -> bytes | None:
        return s.encode() if s is not None else None

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _userns_fd(inside: int, outside: int, gin: int, gout: int) -> int:
    """A user namespace whose only mapping is owner -> agent, for the idmapped mount."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(go_w)
        os.close(ready_r)
        ok = _libc.unshare(CLONE_NEWUSER) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(go_r, 1)
        os._exit(0)
    os.close(go_r)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise MaskError(errno.EPERM, "cannot create a user namespace for the idmapped mount")
        Path(f"/proc/{pid}/uid_map").write_text(f"{inside} {outside} 1\n")
        Path(f"/proc/{pid}/gid_map").write_text(f"{gin} {gout} 1\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def _idmapped_tree(path: str, userns: int) -> int:
    """A detached copy of the mount tree at `path`, idmapped through `userns`."""
    tree = _check(
        _libc.syscall(
            ctypes.c_long(SYS_OPEN_TREE),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE),
        ),
        f"open_tree {path}",
    )
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns)
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_MOUNT_SETATTR),
            ctypes.c_int(tree),
            ctypes.c_char_p(b""),
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"idmapping {path} (needs Linux >= 5.12 and a filesystem that supports idmapped mounts)",
    )
    return tree


def _move(tree: int, target: str) -> None:
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_MOVE_MOUNT),
            ctypes.c_int(tree),
            ctypes.c_char_p(b""),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(target.encode()),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount {target}",
    )


def _map_workspace(ws: Workspace, agent_uid: int, agent_gid: int) -> None:
    userns = _userns_fd(ws.owner_uid, agent_uid, ws.owner_gid, agent_gid)
    try:
        tree = _idmapped_tree(ws.path, userns)
    finally:
        os.close(userns)
    try:
        if ws.reveal is not None:
            # A 0700 home above the workspace: an empty tmpfs over it with only the way down.
            _mount("tmpfs", ws.reveal, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            rel = Path(ws.path).relative_to(ws.reveal)
            (Path(ws.reveal) / rel).mkdir(mode=0o755, parents=True, exist_ok=True)
        _move(tree, ws.path)
        if ws.reveal is not None:
            _mount(None, ws.reveal, None, MS_REMOUNT | MS_BIND | MASK_FLAGS)
    finally:
        os.close(tree)


def _mask(path: str, empty_file: str, empty_dir: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # not visible in this view (e.g. under a masked dir or an emptied home)
    except PermissionError as e:
        raise MaskError(e.errno, f"cannot look at {path} to mask it") from None
    source = empty_dir if stat.S_ISDIR(st.st_mode) else empty_file
    _mount(source, path, None, MS_BIND)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MASK_FLAGS)


def apply_plan(plan: MountPlan) -> None:
    """In a new mount namespace of this process: map the workspace, then mask (deepest
    paths first, so a masked directory never hides a mask still to be made)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    if plan.workspace is not None:
        _map_workspace(plan.workspace, plan.agent_uid, plan.agent_gid)
    for path in sorted(plan.masks, key=lambda p: p.count("/"), reverse=True):
        _mask(path, plan.empty_file, plan.empty_dir)
    if plan.trust_bundle is not None:
        for path in plan.system_bundles:
            if os.path.isfile(path):
                _mount(plan.trust_bundle, path, None, MS_BIND)
                _mount(None, path, None, MS_REMOUNT | MS_BIND | MASK_FLAGS)
    # Re-enter the current directory by path: the old reference points under the new mounts.
    os.chdir(plan.cwd)


def main(argv: Iterable[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m gateway.pod.masking PLAN_JSON -- CMD...", file=sys.stderr)
        return 2
    try:
        apply_plan(MountPlan.from_json(args[0]))
    except OSError as e:
        print(f"keyward: cannot prepare the agent's view of the filesystem: {e}", file=sys.stderr)
        return 126
    os.execvp(args[2], args[2:])
    return 127  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    raise SystemExit(main())
