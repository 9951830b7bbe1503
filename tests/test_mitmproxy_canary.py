"""Canary for the mitmproxy internals the mitm plane relies on.

keyward patches parts of mitmproxy that are not public API (the HTTP/1 reader and writer for
trailers, the error pages of both HTTP versions, the TLS addon's certificate store, the proxy
server's per-connection transports). pyproject.toml bounds mitmproxy to the releases this was
tested with; these tests fail loudly when the installed one is outside that range or when one of
those internals has moved, before any traffic test fails in a confusing way."""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def declared_mitmproxy() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = (Requirement(d) for d in deps if re.match(r"mitmproxy\b", d))
    return req


def test_mitmproxy_requirement_has_an_upper_bound() -> None:
    """Internals change between majors: the range must end somewhere."""
    req = declared_mitmproxy()
    assert any(s.operator in ("<", "<=") for s in req.specifier), str(req)


def test_installed_mitmproxy_is_in_the_tested_range() -> None:
    installed = Version(version("mitmproxy"))
    req = declared_mitmproxy()
    assert req.specifier.contains(installed, prereleases=True), (
        f"mitmproxy {installed} is outside the tested range {req.specifier}: the mitm plane "
        "patches its internals (gateway/planes/mitm/trailers.py, errors.py, master.py, "
        "timeouts.py); test those against this release, then move the bound in pyproject.toml"
    )


def test_patched_internals_are_where_the_mitm_plane_expects_them() -> None:
    import h2.stream
    from mitmproxy.addons import proxyserver, tlsconfig
    from mitmproxy.proxy.layers.http import _http1, _http2
    from mitmproxy.proxy.layers.http._events import RequestTrailers, ResponseTrailers

    assert callable(_http1.make_error_response)
    assert list(inspect.signature(_http1.make_error_response).parameters)[:2] == [
        "status_code",
        "message",
    ]
    # errors.py replaces the name _http2 calls, so it must be looked up in _http2's namespace
    assert "format_error(" in inspect.getsource(_http2)
    assert callable(_http2.format_error)
    # ... and writes an HTTP/2 page itself, in the server layer's event handler, where a
    # stream still open for us without headers sent may get one
    assert "_handle_event" in vars(_http2.Http2Server)
    assert callable(_http2.Http2Connection.is_open_for_us)
    assert "headers_sent" in inspect.getsource(h2.stream.H2StreamStateMachine)
    for cls in (_http1.Http1Server, _http1.Http1Client):
        assert callable(cls.send)
    assert "def read_body" in inspect.getsource(_http1.Http1Connection)
    # trailers.py completes these events from the HTTP/1 reader
    assert "trailers" in inspect.signature(RequestTrailers).parameters
    assert "trailers" in inspect.signature(ResponseTrailers).parameters
    assert callable(tlsconfig.TlsConfig.configure)
    assert "connections" in inspect.getsource(proxyserver.Proxyserver.__init__)
