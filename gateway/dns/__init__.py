"""The DNS plane: a listener that answers only names the policy allows, and its resolver."""

from gateway.dns.resolver import Resolver
from gateway.dns.server import AnswerLog, DnsListener, TokenBuckets
from gateway.errors import NameNotFound, NotSupported, ResolveError

__all__ = [
    "AnswerLog",
    "DnsListener",
    "NameNotFound",
    "NotSupported",
    "ResolveError",
    "Resolver",
    "TokenBuckets",
]
