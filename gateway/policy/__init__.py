"""Sans-IO egress policy: host matching, decisions and injection plans."""

from gateway.errors import NotAllowedError
from gateway.policy.apply import apply_plan, swap_placeholders
from gateway.policy.core import (
    ConnectionDecision,
    Decision,
    HeaderWrite,
    HostRule,
    Injection,
    InjectionPlan,
    Placeholder,
    Plane,
    Policy,
    RequestFacts,
    Verdict,
)
from gateway.policy.hosts import HostMatcher, HostPattern, normalise_host, parse_pattern
from gateway.policy.paths import normalise_path, parse_path_rule
from gateway.policy.templates import Template, parse_template

__all__ = [
    "ConnectionDecision",
    "Decision",
    "HeaderWrite",
    "HostMatcher",
    "HostPattern",
    "HostRule",
    "Injection",
    "InjectionPlan",
    "NotAllowedError",
    "Placeholder",
    "Plane",
    "Policy",
    "RequestFacts",
    "Template",
    "Verdict",
    "apply_plan",
    "normalise_host",
    "normalise_path",
    "parse_path_rule",
    "parse_pattern",
    "parse_template",
    "swap_placeholders",
]
