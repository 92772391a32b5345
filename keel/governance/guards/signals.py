"""Structural signals of a prompt injection, named so a guard event can say why it fired.

Each signal is a cheap, high-precision test on the raw text; they feed the injection classifier as
extra features (their weights are learnt with the n-gram weights) and are reported with each finding.

- `instruction_override`: "ignore/disregard/forget … previous/prior … instructions/rules", "new
  instructions:", "from now on you will …" — in English, German, French, Spanish, Portuguese, Italian.
- `role_play`: a persona framed to shed the rules ("you are now DAN", "pretend you have no
  restrictions", "developer mode"); a plain persona ("act as a tour guide") does not fire.
- `system_prompt_request`: asks for the hidden prompt or instructions.
- `encoded_payload`: a base64 run that decodes to text, or a rot13 text, that carries an override,
  role-play or prompt request; binary base64 (an image, a key) does not fire.
- `leetspeak`: the override/role-play only appears once digits are folded (`1gn0r3 pr3v10us`).
- `invisible_unicode`: zero-width spaces, word joiners, bidi overrides or Unicode tag characters;
  the joiners inside emoji sequences and between letters of scripts that use them do not fire.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata

NAMES = ("instruction_override", "role_play", "system_prompt_request", "encoded_payload", "leetspeak",
         "invisible_unicode")

_V = r"(?:ignore|disregard|forget|override|bypass|skip|drop|abandon)"
_PRIOR = (r"(?:all\s+|any\s+|the\s+|your\s+|my\s+|these\s+|those\s+|of\s+)*(?:previous|prior|above|earlier|preceding|"
          r"initial|original|system|existing|old)")
_RULE = r"(?:instructions?|rules?|guidelines?|directives?|prompts?|constraints?|restrictions?|guardrails?|programming)"
_OVERRIDE = re.compile("|".join([
    rf"\b{_V}\s+{_PRIOR}\s+(?:\w+\s+)?{_RULE}",
    rf"\b{_V}\s+(?:all|everything)\s+(?:you\s+were\s+told|above|before|previous)",
    r"\bnew\s+(?:system\s+)?instructions?\s*:",
    r"\bfrom\s+now\s+on,?\s+(?:you\s+(?:will|must|are|shall)|ignore|only\s+obey)",
    r"\bsystem\s+override\b",
    # de, fr, es, pt, it
    r"\b(?:ignoriere|vergiss|missachte)\b.{0,30}\b(?:vorherigen?|bisherigen?|obigen?|alle)\b.{0,20}"
    r"(?:anweisungen|regeln|vorgaben|instruktionen)",
    r"\b(?:ignore[sz]?|oublie[sz]?)\b.{0,30}\b(?:instructions|consignes|règles)\b.{0,20}(?:précédentes|antérieures)",
    r"\b(?:ignora|olvida|ignore|esqueça|esquece|dimentica)\b.{0,30}\b(?:instrucciones|instruções|instruzioni|"
    r"reglas|regras|regole)\b.{0,20}(?:anteriores|precedenti|previas|prévias)",
]))
_ROLE = re.compile("|".join([
    r"\byou\s+are\s+now\s+(?:dan|in\s+developer\s+mode|unrestricted|jailbroken|unfiltered|free\s+from)",
    r"\b(?:enable|activate|enter|switch\s+to)\s+(?:developer|debug|god|jailbreak|dan|unrestricted)\s+mode",
    r"\b(?:pretend|imagine|act\s+as\s+if|roleplay|role-play|play\s+a\s+character|you\s+are\s+an?\s+ai)\b.{0,80}"
    r"\b(?:no|without|free\s+of|free\s+from|zero)\s+(?:restrictions|rules|limits|filters|guidelines|content\s+policy|"
    r"ethics|morals|censorship)",
    r"\bdo\s+anything\s+now\b",
]))
_PROMPT = re.compile(
    r"\b(?:reveal|show|print|display|output|repeat|leak|dump|disclose|tell\s+me|what\s+(?:are|is))\s+(?:me\s+)?"
    r"(?:your|the)\s+(?:full\s+|entire\s+|exact\s+|hidden\s+|secret\s+)?(?:system|initial|hidden|original|secret)"
    r"\s+(?:prompt|instructions|message|configuration)|\brepeat\s+(?:everything|all|the\s+text)\s+above\b")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_B64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")
_WORDS = re.compile(r"[a-z]{2,}")
# zero-width space, word joiners and invisible operators, BOM, bidi embeddings/overrides/isolates
_INVISIBLE = re.compile("[\u200b\u2060-\u2064\ufeff\u202a-\u202e\u2066-\u2069\U000e0000-\U000e007f]")
_JOINERS = re.compile("[\u200c\u200d]")


def _hostile(lowered: str) -> bool:
    return bool(_OVERRIDE.search(lowered) or _ROLE.search(lowered) or _PROMPT.search(lowered))


def _decoded_b64(text: str) -> list[str]:
    out = []
    for m in _B64.finditer(text):
        run = m.group(0)
        try:
            raw = base64.b64decode(run + "=" * (-len(run) % 4), validate=False)
            s = raw.decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if s and sum(c.isprintable() or c.isspace() for c in s) / len(s) > 0.95:
            out.append(s.lower())
    return out


def _rot13_hostile(lowered: str) -> bool:
    if len(_WORDS.findall(lowered)) < 3:
        return False
    return _hostile(codecs.decode(lowered, "rot13")) and not _hostile(lowered)


def _invisible(text: str) -> bool:
    if _INVISIBLE.search(text.lstrip("\ufeff")):
        return True
    for m in _JOINERS.finditer(text):  # joiners are normal inside emoji and in scripts that use them
        i = m.start()
        before, after = text[i - 1:i], text[i + 1:i + 2]
        if before.isascii() and after.isascii() and before.isalpha() and after.isalpha():
            return True
    return False


def fired(text: str) -> list[str]:
    """The names of the signals that fire on `text`, in NAMES order."""
    if not text:
        return []
    lowered = unicodedata.normalize("NFKC", text).lower()
    lowered = _INVISIBLE.sub("", _JOINERS.sub("", lowered))
    out = []
    if _OVERRIDE.search(lowered):
        out.append("instruction_override")
    if _ROLE.search(lowered):
        out.append("role_play")
    if _PROMPT.search(lowered):
        out.append("system_prompt_request")
    if any(_hostile(s) for s in _decoded_b64(text)) or _rot13_hostile(lowered):
        out.append("encoded_payload")
    if not out and any(c in lowered for c in "0134579@$") and _hostile(lowered.translate(_LEET)):
        out.append("leetspeak")
    if _invisible(text):
        out.append("invisible_unicode")
    return out
