"""The parts of mitmproxy keyward runs, loaded without the forty built-in addons it does not.

`mitmproxy/addons/__init__.py` imports every default addon (a Flask app for onboarding, LDAP
for proxy auth, a browser launcher, ...), and `mitmproxy.master` imports that package: about
half a second of `keyward run` start-up. The package is registered here without running its
`__init__`; submodules import as usual, and the first other name asked of it (e.g.
`default_addons`, used by mitmproxy's own tools) runs the real `__init__` then.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

PACKAGE = "mitmproxy.addons"


def register_lazy_addons_package() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    loader = spec.loader
    module = importlib.util.module_from_spec(spec)

    def __getattr__(name: str) -> ModuleType | object:
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{PACKAGE}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{PACKAGE}.{name}":
                    raise
        module.__dict__.pop("__getattr__", None)
        loader.exec_module(module)  # the real __init__, once
        value: object = getattr(module, name)
        return value

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[PACKAGE] = module


register_lazy_addons_package()

from mitmproxy import options  # noqa: E402
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig  # noqa: E402
from mitmproxy.master import Master  # noqa: E402

__all__ = [
    "Master",
    "core",
    "disable_h2c",
    "next_layer",
    "options",
    "proxyserver",
    "register_lazy_addons_package",
    "tlsconfig",
]
