"""Every error keyward raises on purpose, in one tree (the layout of httpx's `_exceptions.py`).

Library code raises these and never decides how a process ends: the exit status of each class
is mapped in one place, `gateway/cli/main.py`. Messages name files, keys and sources, never a
secret value. This module imports nothing of keyward's, so every layer may raise from it.

    KeywardError                  a failure the user can act on; the CLI prints it as one line
    ├── UsageError                bad arguments or a bad input file
    │   └── ConfigError           every problem in a config file, one `file:line: key:` each
    ├── SecretError               one secret could not be loaded
    │   └── StaleTokenError       an OAuth secret has no current access token
    │       └── TokenUnavailable  ... and none could be minted
    ├── SecretsError              every secret that failed to load, one line each
    ├── SecretsUnresolved         those same failures explained at their `file:line`
    ├── PlaceholderError          the placeholder seed is unusable
    ├── CAError                   the CA files are unusable
    ├── NetfilterError            iptables is missing, legacy, or refused the rules
    ├── PodError                  a network namespace or mount step failed
    │   ├── NetnsError            an `ip` command failed (the message carries its stderr)
    │   └── MaskError             a mount step failed (also an `OSError`, with its errno)
    ├── PairError                 a pair could not be brought up, found or inspected
    │   └── NameHeld              a name the pair needs belongs to something else
    ├── NotAllowedError           a plan was applied for a request the policy denied
    ├── AddressRefused            a name resolved to a special address no rule allows
    ├── ResolveError              a name could not be resolved (SERVFAIL)
    │   ├── NameNotFound          the name does not exist (NXDOMAIN)
    │   └── NotSupported          no source answers this record type (NOTIMP)
    └── ScrubError                a body cannot be scrubbed past this point
        └── UnscrubbableEncoding  a content coding keyward cannot decode

One keeps a builtin second base because callers rely on it: `MaskError` is built with an errno.

Outside the tree: `gateway.engine.errors` (`EngineError` and its status classes, `EngineNotFound`)
and `gateway.engine.service.ServiceError` belong to the engine client, which imports nothing of
keyward's; the CLI reports them as one line too.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.reasons import Reason


class KeywardError(Exception):
    """A failure the user can act on; printed as one line, no traceback unless --debug."""


class UsageError(KeywardError):
    """Bad arguments or a bad config file."""


class ConfigError(UsageError):
    """Every problem in a config file, one per line (each issue prints as `file:line: key: ...`)."""

    def __init__(self, issues: Sequence[object]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __str__(self) -> str:
        n = len(self.issues)
        head = f"{n} error{'s' if n != 1 else ''} in config:\n" if n > 1 else ""
        return head + "\n".join(str(i) for i in self.issues)


class SecretError(KeywardError):
    """One secret could not be loaded. The message names the secret and its source, never a
    value (nor anything a command printed)."""

    def __init__(self, secret: str | None, source: str, problem: str) -> None:
        self.secret = secret
        self.source = source
        self.problem = problem
        where = f"{source} {problem}" if source else problem
        super().__init__(f"secret {secret!r}: {where}" if secret is not None else where)


class StaleTokenError(SecretError):
    """An OAuth secret has no current access token (never minted, or expired). Raised instead of
    injecting a stale token."""


class TokenUnavailable(StaleTokenError):
    """No fresh access token could be minted. The message never holds a secret value."""

    def __init__(self, name: str, reason: str) -> None:
        self.reason = reason
        super().__init__(name, "oauth", f"no fresh access token: {reason}")


class SecretsError(KeywardError):
    """Every secret that failed to load, one line each."""

    def __init__(self, errors: Sequence[SecretError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class SecretsUnresolved(KeywardError):
    """Secrets that could not be read, each at its `file:line`, with what to do about it."""


class PlaceholderError(KeywardError):
    """The placeholder seed is unusable, or no fake can be made for a value."""


class CAError(KeywardError):
    """The CA files are unusable; the message says which file and what to do."""


class NetfilterError(KeywardError):
    """iptables is missing, legacy, or refused the rules."""


class PodError(KeywardError):
    """Setting up the agent's namespaces or mounts failed: the agent is not started."""


class NetnsError(PodError):
    """An `ip` command failed; the message carries its stderr."""


class MaskError(PodError, OSError):
    """A mount step failed: the agent is not started."""


class PairError(KeywardError):
    """The pair could not be brought up, found or inspected."""


class NameHeld(PairError):
    """A name the pair needs belongs to something else (another pair, or not a pair at all)."""


class NotAllowedError(KeywardError):
    """Raised when a plan is applied for a decision that denied the request."""


class AddressRefused(KeywardError):
    """A verified name resolved to (or a connection was headed for) a special address that no
    rule allows it to reach. Carries what the audit record needs; never a secret."""

    reason = Reason.PRIVATE_ADDRESS

    def __init__(self, name: str, addr: str, category: str) -> None:
        super().__init__(f"{name} -> {addr} is a {category} address")
        self.name = name
        self.addr = addr
        self.category = category


class ResolveError(KeywardError):
    """The answer could not be found out (upstream failed or timed out): SERVFAIL."""


class NameNotFound(ResolveError):
    """The name does not exist: NXDOMAIN."""


class NotSupported(ResolveError):
    """No configured source can answer this record type: NOTIMP."""


class ScrubError(KeywardError):
    """The body cannot be scrubbed past this point; `reason` goes into the audit record."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(reason)
        self.reason = reason


class UnscrubbableEncoding(ScrubError):
    """A content coding this gateway cannot decode, so cannot scrub: a 502."""

    def __init__(self) -> None:
        super().__init__(Reason.UNSCRUBBABLE_ENCODING)
