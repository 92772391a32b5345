"""Prompt token counts for remote deployments, used for reservations and rate limits before a call (the
provider's reported usage settles the bill after it).

Text is counted with the deployment's own tokenizer where one is at hand offline (`options.tokenizer`: the
path of a Hugging Face `tokenizer.json`, read with `tokenizers`), else at about four characters a token.
Images, audio and files are never counted as zero: an image's size is read from its header when it is
inline (PNG, GIF, JPEG, WebP) and priced by the costliest of the big providers' published rules (OpenAI's
512-pixel tiles, Anthropic's pixels/750, Gemini's 768-pixel tiles), else (size unknown) at the most OpenAI
or Anthropic bill for one image; audio at 32 tokens a second (Gemini's rate, the highest) of its
conservatively estimated length; a PDF at 3,000 tokens a page.

>>> estimate_tokens([{"role": "user", "content": [{"type": "text", "text": "what is this?"},
...     {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
1611
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Callable
from typing import Any

from keel.core.errors import ConfigError

IMAGE_MAX = 1600  # an image of unknown size: the most OpenAI (high detail, 1445) or Anthropic (~1600) bill
IMAGE_LOW = 85  # OpenAI's `detail: low`
AUDIO_PER_S = 32  # Gemini's audio rate; OpenAI's is lower
AUDIO_BYTES_PER_S = {"wav": 16_000, "pcm16": 16_000, "mp3": 4_000}  # low bitrates: longer, so more tokens
PDF_PER_PAGE = 3000  # the top of Anthropic's 1,500–3,000 text tokens a page, images inside included
MESSAGE_OVERHEAD = 4  # role and separators in a chat template
PAGE = re.compile(rb"/Type\s*/Page(?!s)")
HEAD = 65_536  # bytes of an inline image read to find its size

Encoder = Callable[[str], int]


def chars(text: str) -> int:
    return math.ceil(len(text) / 4)


def _inline(url: str, limit: int | None = None) -> bytes | None:
    """The bytes of a base64 `data:` URL (the first `limit` or so), or None."""
    if not url.startswith("data:"):
        return None
    data = url.partition(",")[2]
    if limit is not None:
        data = data[: (limit // 3 + 1) * 4]
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        return None


def image_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the start of a PNG, GIF, JPEG or WebP file, or None."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        kind = head[12:16]
        if kind == b"VP8X":
            return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
        if kind == b"VP8 ":
            w, h = struct.unpack("<HH", head[26:30])
            return w & 0x3FFF, h & 0x3FFF
        if kind == b"VP8L" and len(head) >= 25:
            bits = int.from_bytes(head[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(head):
            if head[i] != 0xFF:
                i += 1
                continue
            marker = head[i + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                h, w = struct.unpack(">HH", head[i + 5:i + 9])
                return w, h
            i += 2 + struct.unpack(">H", head[i + 2:i + 4])[0]
    return None


def openai_image(width: int, height: int) -> int:
    """OpenAI, high detail: fit in 2048×2048, shortest side at most 768, then 170 a 512-pixel tile plus 85."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
    if min(w, h) > 768:
        w, h = w * 768 / min(w, h), h * 768 / min(w, h)
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_image(width: int, height: int) -> int:
    """Anthropic: the long edge scaled to at most 1568 pixels, then pixels / 750."""
    scale = min(1.0, 1568 / max(width, height, 1))
    return math.ceil(width * scale * height * scale / 750)


def gemini_image(width: int, height: int) -> int:
    """Gemini: 258 for an image up to 384 pixels a side, else 258 a 768-pixel tile."""
    return 258 if max(width, height) <= 384 else 258 * math.ceil(width / 768) * math.ceil(height / 768)


def image_tokens(width: int, height: int) -> int:
    """The most any of OpenAI (high detail), Anthropic and Gemini bill for a `width`×`height` image."""
    return max(openai_image(width, height), anthropic_image(width, height), gemini_image(width, height), 1)


def part_tokens(part: dict[str, Any], encode: Encoder) -> int:
    """One content part's tokens: text through `encode`, media by the rules above (never zero)."""
    kind = part.get("type")
    if kind == "text" or (kind is None and "text" in part):
        return encode(str(part.get("text") or ""))
    if kind == "image_url":
        image = part.get("image_url") or {}
        image = {"url": image} if isinstance(image, str) else image
        if image.get("detail") == "low":
            return IMAGE_LOW
        head = _inline(str(image.get("url") or ""), HEAD)
        size = image_size(head) if head else None
        return image_tokens(*size) if size else IMAGE_MAX
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        data = str(audio.get("data") or "")
        seconds = len(data) * 3 / 4 / AUDIO_BYTES_PER_S.get(str(audio.get("format")), 4_000)
        return max(AUDIO_PER_S, math.ceil(seconds * AUDIO_PER_S))
    if kind == "file":
        raw = _inline(str((part.get("file") or {}).get("file_data") or ""))
        pages = len(PAGE.findall(raw)) if raw else 0
        return PDF_PER_PAGE * max(1, pages)
    return max(IMAGE_LOW, chars(str(part)))  # a part Keel does not know: at least a small image's worth


def estimate_tokens(messages: list[dict[str, Any]], encode: Encoder = chars) -> int:
    """A chat prompt's tokens: each message's text and media, its tool calls, and a per-message overhead."""
    total = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            total += encode(content)
        elif isinstance(content, list):
            total += sum(part_tokens(p, encode) for p in content if isinstance(p, dict))
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            total += encode(str(fn.get("name") or "")) + encode(str(fn.get("arguments") or ""))
    return total + MESSAGE_OVERHEAD * len(messages) + 3


def load_tokenizer(path: str, where: str) -> Encoder:
    """A text → token count function from a Hugging Face `tokenizer.json` (no special tokens added)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a plain Exception for a missing or malformed file
        raise ConfigError(f"{where}: options.tokenizer {path} cannot be loaded ({exc})",
                          fix="point options.tokenizer at the model's tokenizer.json, or remove it") from None
    tokenizer.no_truncation()  # a file made for a model's input may cut or pad: a count must do neither
    tokenizer.no_padding()

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids) if text else 0
    return count
