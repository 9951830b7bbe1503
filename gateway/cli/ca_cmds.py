"""`keyward ca init|show|bundle`: the gateway CA. Prints certificate facts, never the key."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.config.paths import state_dir
from gateway.tls.ca import CertificateAuthority, write_bundle

BUNDLE_FILE = "ca-bundle.pem"


def _ca(args: argparse.Namespace) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(state_dir(args.state))


def cmd_init(args: argparse.Namespace) -> int:
    ca = _ca(args)
    print(f"CA certificate: {ca.cert_path}")
    print(f"SHA-256 fingerprint: {ca.fingerprint_sha256}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ca = _ca(args)
    if args.pem:
        sys.stdout.write(ca.cert_pem.decode("ascii"))
        return 0
    info = {
        "subject": ca.subject,
        "fingerprint_sha256": ca.fingerprint_sha256,
        "not_before": ca.not_before.isoformat(),
        "not_after": ca.not_after.isoformat(),
        "cert_path": str(ca.cert_path),
    }
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    for key, value in info.items():
        print(f"{key.replace('_', ' ')}: {value}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    ca = _ca(args)
    out = Path(args.out) if args.out else state_dir(args.state) / BUNDLE_FILE
    print(write_bundle(ca, out))
    return 0


def cmd_help(args: argparse.Namespace) -> int:
    args.ca_parser.print_help(sys.stderr)
    return 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the gateway CA (created once; the private key never leaves)")
    ca.set_defaults(func=cmd_help, ca_parser=ca)
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="SUBCOMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = ca_sub.add_parser(name, help=help_text)
        p.add_argument(
            "--state", metavar="DIR", help="state dir (default $KEYWARD_STATE or ~/.local/state)"
        )
        return p

    p = add("init", "create the CA (or reuse it); print its certificate path and fingerprint")
    p.set_defaults(func=cmd_init)

    p = add("show", "print subject, fingerprint, validity and certificate path")
    p.add_argument("--json", action="store_true")
    p.add_argument("--pem", action="store_true", help="print the certificate (PEM) only")
    p.set_defaults(func=cmd_show)

    p = add("bundle", "write system roots + the CA certificate, for agents to trust")
    p.add_argument("--out", metavar="FILE", help=f"output file (default <state>/{BUNDLE_FILE})")
    p.set_defaults(func=cmd_bundle)
