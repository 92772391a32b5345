"""Secrets guard: API keys and tokens of well-known formats, private keys, passwords in URLs and
credential assignments (`password=…`). Only the secret part of a match is reported."""

from __future__ import annotations

import re
from typing import ClassVar

from keel.governance.guards.base import Finding, resolve_overlaps
from keel.governance.guards.decode import decoded_findings, reveal

# (type, literal hints of which one must be in the text, pattern, group holding the secret).
# Order is priority when two overlap. Hints keep the scan cheap: most patterns never run on most text;
# an empty hint tuple means "always run"; hints starting with "~" are matched case-insensitively.
PATTERNS: list[tuple[str, tuple[str, ...], re.Pattern[str], int]] = [
    ("private_key", ("-----BEGIN",), re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
                                               r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"), 0),
    ("keel_api_key", ("sk-keel-",), re.compile(r"sk-keel-[a-z0-9]{12}_[A-Za-z0-9_\-]{20,}"), 0),
    ("anthropic_api_key", ("sk-ant-",), re.compile(r"sk-ant-(?:api|admin)\d{2}-[A-Za-z0-9_\-]{32,}"), 0),
    ("openai_api_key", ("sk-",), re.compile(r"sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_\-]{32,}"), 0),
    ("aws_access_key_id", ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA"),
     re.compile(r"(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}(?![0-9A-Za-z])"), 0),
    ("aws_secret_access_key", ("~aws",), re.compile(r"(?i)aws.{0,20}?(?:secret|private)?.{0,10}?key\W{0,5}[:=]"
                                                   r"\W{0,3}([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"), 1),
    ("github_token", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})(?![A-Za-z0-9_])"), 0),
    ("gitlab_token", ("glpat-",), re.compile(r"glpat-[A-Za-z0-9_\-]{20,}"), 0),
    ("slack_token", ("xox",), re.compile(r"xox[abposr]-[A-Za-z0-9-]{10,}"), 0),
    ("slack_webhook", ("hooks.slack.com",),
     re.compile(r"https://hooks\.slack\.com/services/T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+"), 0),
    ("stripe_key", ("_live_", "_test_"), re.compile(r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"), 0),
    ("google_api_key", ("AIza",), re.compile(r"AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"), 0),
    ("google_oauth_token", ("ya29.",), re.compile(r"ya29\.[0-9A-Za-z_\-]{20,}"), 0),
    ("huggingface_token", ("hf_",), re.compile(r"hf_[A-Za-z]{34,}(?![A-Za-z0-9_])"), 0),
    ("npm_token", ("npm_",), re.compile(r"npm_[A-Za-z0-9]{36}(?![A-Za-z0-9_])"), 0),
    ("sendgrid_key", ("SG.",), re.compile(r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])"), 0),
    ("twilio_key", ("SK",), re.compile(r"SK[0-9a-f]{32}(?![0-9A-Za-z])"), 0),
    ("azure_storage_key", ("AccountKey=",), re.compile(r"AccountKey=([A-Za-z0-9+/=]{60,})"), 1),
    ("jwt", ("eyJ",), re.compile(r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{16,}"), 0),
    ("url_password", ("://",), re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{1,20}://[^\s/:@]{1,100}:([^\s/@]{1,200})@"), 1),
    ("credential_assignment", ("~pass", "~pwd", "~secret", "~key", "~token"),
     re.compile(r"(?i)(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)\s*[:=]\s*"
                r"['\"]?([^\s'\"]{6,200})"), 1),
]
# A match must not continue a longer word on its left (what `\b` did, without slowing the scan).
_LEFT_WORD = {"keel_api_key", "anthropic_api_key", "openai_api_key", "aws_access_key_id", "github_token",
              "gitlab_token", "slack_token", "stripe_key", "google_api_key", "google_oauth_token",
              "huggingface_token", "npm_token", "sendgrid_key", "twilio_key", "jwt", "url_password",
              "credential_assignment"}


class SecretsGuard:
    """Finds credentials; redaction replaces only the secret (`<SECRET_…>`-style placeholders)."""

    name: ClassVar[str] = "secrets"
    sides: ClassVar[frozenset[str]] = frozenset({"input", "output", "context"})

    def scan(self, text: str) -> list[Finding]:
        """Findings in the text as written and inside its percent/base64/hex-encoded runs."""
        if not text:
            return []
        text = reveal(text)  # tag characters read as the ASCII they hide
        found = [(0, f.start - f.end, f.start, f) for f in self._plain(text) + decoded_findings(text, self._plain)]
        return resolve_overlaps(found)

    def _plain(self, text: str) -> list[Finding]:
        lowered: str | None = None
        found = []
        for prio, (kind, hints, rx, group) in enumerate(PATTERNS):
            if hints:
                if hints[0].startswith("~"):
                    lowered = lowered if lowered is not None else text.lower()
                    if not any(h[1:] in lowered for h in hints):
                        continue
                elif not any(h in text for h in hints):
                    continue
            for m in rx.finditer(text):
                if kind in _LEFT_WORD and m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] == "_"):
                    continue
                a, b = m.span(group)
                if b > a:
                    found.append((prio, a - b, a, Finding(self.name, kind, a, b)))
        return resolve_overlaps(found)
