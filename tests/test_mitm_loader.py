"""keyward loads only the mitmproxy addons it runs; mitmproxy's own API stays whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_unused_builtin_addons_are_not_imported_and_the_package_still_works() -> None:
    code = textwrap.dedent(
        """
        import sys
        import gateway.planes.mitm.master
        loaded = sorted(m for m in sys.modules if m.startswith("mitmproxy.addons."))
        assert "mitmproxy.addons.onboarding" not in loaded, loaded
        assert "mitmproxy.addons.proxyauth" not in loaded, loaded
        assert "flask" not in sys.modules
        assert "mitmproxy.addons.proxyserver" in loaded
        import mitmproxy.addons as addons
        names = {type(a).__name__ for a in addons.default_addons()}
        assert {"Core", "Proxyserver", "ProxyAuth"} <= names, names
        from mitmproxy.addons import onboarding
        from mitmproxy.tools.dump import DumpMaster
        print(len(loaded), len(names))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    few, all_ = map(int, out.stdout.split())
    assert few < 12 < all_
