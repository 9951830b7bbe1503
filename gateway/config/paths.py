"""Where keyward keeps state (CA, placeholder seed, OAuth cache) and finds its config, and how
state files are written."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

CONFIG_NAMES = ("keyward.yaml", "keyward.yml")


def state_dir(explicit: str | os.PathLike[str] | None = None, *, create: bool = True) -> Path:
    """`explicit`, else `$KEYWARD_STATE`, else `$XDG_STATE_HOME/keyward` (~/.local/state)."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get("KEYWARD_STATE"):
        path = Path(os.environ["KEYWARD_STATE"])
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "keyward"
    if create:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`-c FILE`, else `$KEYWARD_CONFIG`, else ./keyward.yaml."""
    if explicit:
        return Path(explicit)
    if os.environ.get("KEYWARD_CONFIG"):
        return Path(os.environ["KEYWARD_CONFIG"])
    for name in CONFIG_NAMES:
        if Path(name).exists():
            return Path(name)
    return Path(CONFIG_NAMES[0])


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """A crash leaves the old file or the new one, never half; the final mode is set before
    any byte lands, so a private file is never readable by others even for a moment."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
