"""The gateway CA: persisted once, key kept private, usable by mitmproxy to sign real leaves."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import CAError
from gateway.tls.ca import CertificateAuthority, system_roots_path, write_bundle

ROOT = Path(__file__).resolve().parent.parent


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("state")
    CertificateAuthority.load_or_create(state)
    return state


def test_created_with_private_modes_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ca = CertificateAuthority.load_or_create(state)
    assert mode(state / "ca") == 0o700
    assert mode(state / "ca" / "ca-key.pem") == 0o600
    assert ca.cert_path == state / "ca" / "ca-cert.pem"
    assert ca.cert_path.read_bytes() == ca.cert_pem
    again = CertificateAuthority.load_or_create(state)
    assert again.fingerprint_sha256 == ca.fingerprint_sha256
    assert again.cert_pem == ca.cert_pem
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    assert other.fingerprint_sha256 != ca.fingerprint_sha256


def test_certificate_is_a_proper_ca(ca_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(ca_dir)
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str) and cn.startswith("keyward CA ") and len(cn) > len("keyward CA ")
    assert ca.subject == cert.subject.rfc4514_string()
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    life = ca.not_after - ca.not_before
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3652)
    assert ca.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=3640)
    cert.verify_directly_issued_by(cert)
    hexes = ca.fingerprint_sha256.split(":")
    assert len(hexes) == 32 and all(len(h) == 2 and h == h.upper() for h in hexes)


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    key = tmp_path / "ca" / "ca-key.pem"
    key.chmod(0o644)
    with pytest.raises(CAError) as e:
        CertificateAuthority.load_or_create(tmp_path)
    msg = str(e.value)
    assert str(key) in msg and "0644" in msg and "chmod 600" in msg
    assert "PRIVATE KEY" not in msg
    key.chmod(0o600)
    CertificateAuthority.load_or_create(tmp_path)


def test_mismatched_or_garbled_files_are_clear_errors(tmp_path: Path) -> None:
    a = CertificateAuthority.load_or_create(tmp_path / "a")
    CertificateAuthority.load_or_create(tmp_path / "b")
    (tmp_path / "b" / "ca" / "ca-cert.pem").write_bytes(a.cert_pem)
    with pytest.raises(CAError, match="does not match the key"):
        CertificateAuthority.load_or_create(tmp_path / "b")
    (tmp_path / "b" / "ca" / "ca-key.pem").write_text("garbage")
    with pytest.raises(CAError, match="not an unencrypted PEM private key"):
        CertificateAuthority.load_or_create(tmp_path / "b")


def test_half_written_ca_is_replaced(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca" / "ca-cert.pem").unlink()
    second = CertificateAuthority.load_or_create(tmp_path)
    assert second.fingerprint_sha256 != first.fingerprint_sha256
    assert CertificateAuthority.load_or_create(tmp_path).fingerprint_sha256 == (
        second.fingerprint_sha256
    )


def test_concurrent_first_start_makes_one_ca(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from gateway.tls.ca import CertificateAuthority;"
        "print(CertificateAuthority.load_or_create(Path(sys.argv[1])).fingerprint_sha256)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    prints = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(prints) == 1
    assert prints == {CertificateAuthority.load_or_create(tmp_path).fingerprint_sha256}


def test_repr_and_public_api_never_hold_the_key(ca_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(ca_dir)
    texts = [repr(ca), str(ca), ca.cert_pem.decode(), ca.subject]
    for name in dir(ca):
        if not name.startswith("_"):
            texts.append(repr(getattr(ca, name)))
    assert not any("PRIVATE KEY" in t for t in texts)


# -- mitmproxy ---------------------------------------------------------------------------


def test_mitmproxy_gets_the_key_in_memory_and_stale_copies_go(tmp_path: Path) -> None:
    """No second copy of the key for mitmproxy: an old one (earlier versions kept it in a
    confdir) is removed on load."""
    ca = CertificateAuthority.load_or_create(tmp_path)
    stale = tmp_path / "ca" / "mitmproxy" / "mitmproxy-ca.pem"
    stale.parent.mkdir()
    stale.write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nold\n")
    again = CertificateAuthority.load_or_create(tmp_path)
    assert not stale.exists()
    assert again.fingerprint_sha256 == ca.fingerprint_sha256
    store = again.mitmproxy_certstore()
    assert store.default_chain_file is None
    keys = [p for p in tmp_path.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert keys == [tmp_path / "ca" / "ca-key.pem"]


def test_ephemeral_ca_has_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ca = CertificateAuthority.ephemeral()
    store = ca.mitmproxy_certstore()
    entry = store.get_cert("api.example.test", [x509.DNSName("api.example.test")])
    entry.cert._cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem))
    assert not ca.persisted and list(tmp_path.iterdir()) == []
    with pytest.raises(CAError):
        _ = ca.cert_path
    assert CertificateAuthority.ephemeral().fingerprint_sha256 != ca.fingerprint_sha256


def test_mitmproxy_signs_leaves_with_our_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    store = ca.mitmproxy_certstore()
    ours = x509.load_pem_x509_certificate(ca.cert_pem)
    assert store.default_ca._cert == ours
    entry = store.get_cert("api.example.test", [x509.DNSName("api.example.test")])
    leaf = entry.cert._cert
    assert leaf.issuer == ours.subject
    leaf.verify_directly_issued_by(ours)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["api.example.test"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    # and a real TLS client trusting only our CA accepts it for that name
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(
        leaf.public_bytes(serialization.Encoding.PEM)
        + entry.privatekey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(leaf_file)
    client_ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hello")

    t = threading.Thread(target=serve)
    t.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="api.example.test") as tls,
        ):
            assert tls.recv(5) == b"hello"
    finally:
        t.join(10)
        listener.close()


# -- bundles -----------------------------------------------------------------------------


def test_system_roots_path_is_a_pem_bundle() -> None:
    path = system_roots_path()
    assert path is not None and path.is_file()
    assert b"BEGIN CERTIFICATE" in path.read_bytes()


def test_write_bundle_has_roots_and_our_ca(tmp_path: Path, ca_dir: Path) -> None:
    ca = CertificateAuthority.load_or_create(ca_dir)
    out = write_bundle(ca, tmp_path / "sub" / "bundle.pem")
    assert out == tmp_path / "sub" / "bundle.pem"
    assert mode(out) == 0o644
    data = out.read_bytes()
    roots = system_roots_path()
    assert roots is not None
    assert data.startswith(roots.read_bytes()[:200]) and data.endswith(ca.cert_pem)
    assert b"PRIVATE KEY" not in data
    ctx = ssl.create_default_context(cafile=str(out))
    subjects = [c["subject"] for c in ctx.get_ca_certs()]
    assert any(("commonName", ca.subject.split("CN=")[1].split(",")[0]) in s[0] for s in subjects)
    assert len(subjects) > 10


# -- command line ------------------------------------------------------------------------


def keyward(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_cli_init_show_bundle(tmp_path: Path) -> None:
    state = tmp_path / "st"
    init = keyward("ca", "init", "--state", str(state))
    assert init.returncode == 0, init.stderr
    ca = CertificateAuthority.load_or_create(state)
    assert str(ca.cert_path) in init.stdout and ca.fingerprint_sha256 in init.stdout

    show = keyward("ca", "show", "--state", str(state))
    assert show.returncode == 0, show.stderr
    for fact in (ca.subject, ca.fingerprint_sha256, str(ca.cert_path), ca.not_after.isoformat()):
        assert fact in show.stdout

    pem = keyward("ca", "show", "--pem", "--state", str(state))
    assert pem.stdout.encode() == ca.cert_pem

    default = keyward("ca", "bundle", "--state", str(state))
    assert default.returncode == 0 and default.stdout.strip() == str(state / "ca-bundle.pem")
    out = tmp_path / "agent" / "bundle.pem"
    bundle = keyward("ca", "bundle", "--state", str(state), "--out", str(out))
    assert bundle.returncode == 0 and bundle.stdout.strip() == str(out)
    assert out.read_bytes().endswith(ca.cert_pem)

    for proc in (init, show, pem, default, bundle):
        assert "PRIVATE KEY" not in proc.stdout + proc.stderr


def test_cli_loose_key_is_a_one_line_error(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / "ca" / "ca-key.pem").chmod(0o640)
    proc = keyward("ca", "show", "--state", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.startswith("keyward: CA key ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and "PRIVATE KEY" not in proc.stderr


def test_cli_ca_without_subcommand_is_usage(tmp_path: Path) -> None:
    proc = keyward("ca")
    assert proc.returncode == 2
    assert "init" in proc.stderr and "bundle" in proc.stderr
