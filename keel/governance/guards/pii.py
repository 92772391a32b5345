"""PII guard: email, phone, credit card (Luhn), IBAN (mod-97), US SSN, IPv4/IPv6 — own recognisers
with checksums. Person names need an NER model, which the default install does not ship."""

from __future__ import annotations

import ipaddress
import re
from typing import ClassVar

from keel.governance.guards.base import Finding, resolve_overlaps
from keel.governance.guards.decode import decoded_findings, reveal

ENTITIES = ("email", "credit_card", "iban", "ssn", "ip_address", "phone")

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
# Patterns start with a character class (so `re` can skip ahead fast); left-context checks are in `_left_ok`.
_CARD = re.compile(r"\d(?:[ -]?\d){11,18}(?!\d)")
_IBAN = re.compile(r"[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_SSN = re.compile(r"\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
_SSN_BARE = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?)?)\W{0,3}(?:is\W{1,2})?"
                       r"((?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4})\b")
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_GROUP = r"(?:\(\d{1,5}\)|\d{1,15})"
_PHONE = re.compile(rf"\+?{_GROUP}(?:(?:[ .-]|(?<=\))|(?=\())?{_GROUP}){{0,6}}"
                    r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?!\w|[.-]\d)")
_DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})\b")
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
# Lower number wins an overlap: a 16-digit Luhn number is a card, not a phone.
_PRIORITY = {"email": 0, "iban": 1, "credit_card": 2, "ssn": 3, "ip_address": 4, "phone": 5}


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def iban_ok(compact: str) -> bool:
    expected = _IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _left_ok(text: str, start: int, bad: str, word: bool = False) -> bool:
    """The character before a match would not make it part of a longer token."""
    if start == 0:
        return True
    before = text[start - 1]
    return before not in bad and not (word and before.isalnum())


_DIGITS = "0123456789"


def _ssn_ok(m: re.Match[str]) -> bool:
    area, group, serial = m.group()[:3], m.group()[4:6], m.group()[7:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _ipv4_ok(s: str) -> bool:
    return all(int(o) <= 255 and (len(o) == 1 or o[0] != "0") for o in s.split("."))


def _card_ok(text: str) -> bool:
    digits = re.sub(r"[ -]", "", text)
    seps = set(re.findall(r"[ -]", text))
    return 12 <= len(digits) <= 19 and len(seps) <= 1 and len(set(digits)) > 1 and luhn_ok(digits)


def _phone_ok(text: str) -> bool:
    main = re.split(r"\s?(?:x|ext\.?)\s?(?=\d)", text)[0]
    digits = re.sub(r"\D", "", main)
    if _DATE.match(main) or not 9 <= len(digits) <= 15:
        return False
    if main.isdigit():  # an undelimited run: only 10–12 digits looks like a phone number
        return 10 <= len(digits) <= 12
    return not re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", main)


class PiiGuard:
    """Finds personal data; redaction uses stable placeholders (`<EMAIL_3f9a1c>`)."""

    name: ClassVar[str] = "pii"
    sides: ClassVar[frozenset[str]] = frozenset({"input", "output", "context"})

    def __init__(self, entities: list[str] | tuple[str, ...] | None = None) -> None:
        self.entities = frozenset(entities or ENTITIES)

    def _candidates(self, text: str) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        if "@" in text:
            out += [("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
        out += [("credit_card", m.start(), m.end()) for m in _CARD.finditer(text)
                if _left_ok(text, m.start(), _DIGITS + "+-") and _card_ok(m.group())]
        out += [("iban", m.start(), m.end()) for m in _IBAN.finditer(text)
                if _left_ok(text, m.start(), "_+.-", word=True) and iban_ok(m.group().replace(" ", ""))]
        out += [("ssn", m.start(), m.end()) for m in _SSN.finditer(text)
                if _left_ok(text, m.start(), _DIGITS + "-") and _ssn_ok(m)]
        lowered = text.lower()
        if "ssn" in lowered or "social security" in lowered:
            out += [("ssn", m.start(1), m.end(1)) for m in _SSN_BARE.finditer(text)]
        if "." in text:
            out += [("ip_address", m.start(), m.end()) for m in _IPV4.finditer(text)
                    if _left_ok(text, m.start(), _DIGITS + ".") and _ipv4_ok(m.group())]
        if ":" in text:
            out += [("ip_address", m.start(), m.end()) for m in _IPV6.finditer(text) if _ipv6_ok(m.group())]
        out += [("phone", m.start(), m.end()) for m in _PHONE.finditer(text)
                if _left_ok(text, m.start(), "_+.-", word=True) and _phone_ok(m.group())]
        return out

    def scan(self, text: str) -> list[Finding]:
        """Findings in the text as written and inside its percent/base64/hex-encoded runs."""
        if not text:
            return []
        text = reveal(text)  # tag characters read as the ASCII they hide
        found = [(_PRIORITY[t], a - b, a, f) for f in self._plain(text) + decoded_findings(text, self._plain)
                 for t, a, b in ((f.type, f.start, f.end),)]
        return resolve_overlaps(found)

    def _plain(self, text: str) -> list[Finding]:
        return [Finding(self.name, t, a, b) for t, a, b in self._candidates(text) if t in self.entities]


def _ipv6_ok(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True
