"""The gateway's own certificate authority: created once, reused across restarts.

Regenerating the CA on restart breaks every running agent that trusts the old one, and a CA key
that leaves the gateway lets anyone impersonate any site to the agent. So the key is written once,
0600 in a 0700 directory, is refused when its permissions are loose, and no function here returns
or prints it; agents get the certificate only. mitmproxy signs with the key held in memory (no
second copy on disk), and an ephemeral CA (`keyward run` without `--state`) never touches disk.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import secrets
import ssl
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from gateway.config.paths import write_atomic
from gateway.errors import CAError

if TYPE_CHECKING:
    from mitmproxy.certs import CertStore

CA_DIR = "ca"
KEY_FILE = "ca-key.pem"
CERT_FILE = "ca-cert.pem"
LOCK_FILE = ".lock"
# Older versions kept a second copy of the key here for mitmproxy's confdir; removed on load.
STALE_MITMPROXY_KEY = ("mitmproxy", "mitmproxy-ca.pem")
VALIDITY = dt.timedelta(days=3650)

SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL 7+
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, Alpine, BSDs
)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time creates or repairs the CA, so two gateways never mint two CAs."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _secure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) != 0o700:
        path.chmod(0o700)
    return path


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _new_ca() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"keyward CA {secrets.token_hex(4)}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "keyward"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


class CertificateAuthority:
    """The gateway's CA. Holds the key in memory for signing; never exposes it. `directory` is
    None for an ephemeral CA, which has no files at all."""

    def __init__(
        self, directory: Path | None, key: rsa.RSAPrivateKey, cert: x509.Certificate
    ) -> None:
        self._dir = directory
        self.__key = key
        self.cert = cert

    def key_probe(self) -> str:
        """SHA-256 of the key PEM's first base64 line: lets a check inside the agent look for
        the key without being given it."""
        lines = _key_pem(self.__key).splitlines()
        return hashlib.sha256(lines[1].strip()).hexdigest()

    def __repr__(self) -> str:
        return f"CertificateAuthority({self.subject!r}, {self.fingerprint_sha256})"

    @classmethod
    def ephemeral(cls) -> CertificateAuthority:
        """A CA for one process: made in memory, never written anywhere, gone at exit."""
        return cls(None, *_new_ca())

    @classmethod
    def load_or_create(cls, state_dir: Path) -> CertificateAuthority:
        """Load the CA from `state_dir/ca`, creating it on first use."""
        directory = _secure_dir(Path(state_dir) / CA_DIR)
        key_path, cert_path = directory / KEY_FILE, directory / CERT_FILE
        with _locked(directory):
            with contextlib.suppress(FileNotFoundError):
                directory.joinpath(*STALE_MITMPROXY_KEY).unlink()
            if key_path.exists() and cert_path.exists():
                return cls(directory, *cls._load(key_path, cert_path))
            # Nothing (or half of a creation that never finished): nobody trusts it yet.
            key, cert = _new_ca()
            write_atomic(key_path, _key_pem(key), 0o600)
            write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            return cls(directory, key, cert)

    @staticmethod
    def _load(key_path: Path, cert_path: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CAError(
                f"CA key {key_path} is readable by group/other (mode {mode:04o}); it may have "
                f"leaked. Run `chmod 600 {key_path}` to keep it, or delete {key_path.parent} to "
                "make a new CA (agents must then trust the new certificate)"
            )
        try:
            # The key is our own (0600, checked above, matched against the certificate
            # below): skipping cryptography's RSA primality re-check saves ~90 ms per start.
            key = serialization.load_pem_private_key(
                key_path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError):
            raise CAError(f"CA key {key_path} is not an unencrypted PEM private key") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CAError(f"CA key {key_path} is not an RSA key")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError:
            raise CAError(f"CA certificate {cert_path} is not a PEM certificate") from None
        if cert.public_key() != key.public_key():
            raise CAError(f"CA certificate {cert_path} does not match the key {key_path}")
        return key, cert

    # -- public facts -----------------------------------------------------------------------
    @property
    def persisted(self) -> bool:
        return self._dir is not None

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_path(self) -> Path:
        if self._dir is None:
            raise CAError("an ephemeral CA has no certificate file (use cert_pem)")
        return self._dir / CERT_FILE

    @property
    def fingerprint_sha256(self) -> str:
        """Colon-separated upper-case hex, as `openssl x509 -fingerprint -sha256` prints it."""
        return ":".join(f"{b:02X}" for b in self.cert.fingerprint(hashes.SHA256()))

    @property
    def not_before(self) -> dt.datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    # -- signing, in-process only -----------------------------------------------------------
    def mitmproxy_certstore(self) -> CertStore:
        """mitmproxy's certificate store signing with this CA, built in memory: the key is
        handed over as an object, never written to a confdir."""
        from mitmproxy.certs import DEFAULT_DHPARAM, Cert, CertStore

        # DH parameters are public constants; mitmproxy only loads them from a file.
        with tempfile.TemporaryDirectory(prefix="keyward-dh-") as tmp:
            dh_file = Path(tmp) / "dhparam.pem"
            dh_file.write_bytes(DEFAULT_DHPARAM)
            dhparams = CertStore.load_dhparam(dh_file)
        return CertStore(self.__key, Cert(self.cert), None, dhparams)


def system_roots_path() -> Path | None:
    """The platform's PEM bundle of public roots (OpenSSL's default, a distro path, or certifi)."""
    default = ssl.get_default_verify_paths().cafile
    candidates = [default] if default else []
    candidates.extend(SYSTEM_BUNDLES)
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and path.stat().st_size > 0:
            return path
    try:
        import certifi
    except ImportError:
        return None
    path = Path(certifi.where())
    return path if path.is_file() else None


def write_with_system_roots(out: Path, extra: bytes) -> Path:
    """The system roots followed by the `extra` PEM certificates, written to `out` (0644) only
    when it differs, so a running reader never sees the file change under it for nothing."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts: list[bytes] = []
    roots = system_roots_path()
    if roots is not None:
        data = roots.read_bytes()
        parts.append(data if data.endswith(b"\n") else data + b"\n")
    parts.append(extra)
    data = b"".join(parts)
    if not out.exists() or out.read_bytes() != data or stat.S_IMODE(out.stat().st_mode) != 0o644:
        write_atomic(out, data, 0o644)
    return out


def write_bundle(ca: CertificateAuthority, out: Path) -> Path:
    """System roots + our CA certificate, for agents to trust."""
    return write_with_system_roots(out, ca.cert_pem)
