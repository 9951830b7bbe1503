"""Where keyward keeps state (CA, placeholder seed, OAuth cache) and finds its config."""

from __future__ import annotations

import os
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
