# --- keyward netfilter/pod: root and network-namespace tests (begin) ---
# Tests marked `root` need root, `ip netns` and nf_tables iptables. They skip with the reason
# elsewhere, but fail when CI=true: a CI job that silently skips them proves nothing.
import functools as _kw_functools
import os as _kw_os
import shutil as _kw_shutil
import subprocess as _kw_subprocess

import pytest as _kw_pytest


@_kw_functools.cache
def _kw_root_problem() -> str | None:
    """Why root/namespace tests cannot run here, or None; computed once per session."""
    from gateway.pod.netns import can_use_netns

    for tool in ("ip", "iptables", "ip6tables", "iptables-restore", "setpriv"):
        if _kw_shutil.which(tool) is None:
            return f"{tool} not installed"
    problem = can_use_netns()
    if problem:
        return problem
    version = _kw_subprocess.run(
        ["iptables", "-V"], capture_output=True, text=True, check=False
    ).stdout
    if "nf_tables" not in version:
        return f"iptables is not the nf_tables backend: {version.strip()}"
    return None


def require_root() -> None:
    """Skip (or, with CI=true, fail) unless namespaces and nft iptables are usable."""
    problem = _kw_root_problem()
    if problem is None:
        return
    if _kw_os.environ.get("CI", "").lower() == "true":
        _kw_pytest.fail(f"root test cannot run with CI=true: {problem}", pytrace=False)
    _kw_pytest.skip(problem)


@_kw_pytest.fixture(scope="session")
def root_ok() -> None:
    """For module/session fixtures that build namespaces: they run before function markers."""
    require_root()


@_kw_pytest.fixture(autouse=True)
def _kw_root_marker(request: _kw_pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is not None:
        require_root()


# --- keyward netfilter/pod: root and network-namespace tests (end) ---
