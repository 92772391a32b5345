"""Prompt token counts of remote deployments (reservations and rate limits): a deployment's own tokenizer
(`options.tokenizer`, a `tokenizer.json` read offline) counts its text exactly; images, audio and files are
never zero — an inline image is priced from its real size by the costliest provider rule."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import keel.gateway.providers as providers_pkg
from keel.core.errors import ConfigError
from keel.core.settings import DeploymentConfig
from keel.gateway import registry
from keel.gateway.protocol import ProviderContext
from keel.gateway.providers.token_count import (
    IMAGE_LOW, IMAGE_MAX, PDF_PER_PAGE, anthropic_image, estimate_tokens, gemini_image, image_size, image_tokens,
    openai_image,
)

TOKENIZER = Path(providers_pkg.__file__).parent / "local_embed_tokenizer.json"  # shipped in Keel, WordPiece


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + sof0 + b"\0" * 32


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * 16


def webp(width: int, height: int) -> bytes:
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x


def data_url(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_message(url: str, **image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **image}}]}]


BASE = estimate_tokens([{"role": "user", "content": []}])  # the message overhead alone


@pytest.mark.parametrize("make,mime", [(png, "image/png"), (jpeg, "image/jpeg"), (gif, "image/gif"),
                                       (webp, "image/webp")])
def test_an_inline_image_is_priced_from_its_real_size(make, mime):
    assert image_size(make(1000, 600)) == (1000, 600)
    small = estimate_tokens(image_message(data_url(make(200, 100), mime))) - BASE
    large = estimate_tokens(image_message(data_url(make(3000, 2000), mime))) - BASE
    assert small == 258  # Gemini's 258 for an image up to 384 px is the costliest rule there
    assert large == image_tokens(3000, 2000) and small < large


def test_image_rules_match_the_providers_published_examples():
    """OpenAI's vision guide (1024² → 765, 2048×4096 → 1105), Anthropic's table (1092² → ~1590), Gemini's
    258 for a small image; an image costs the most of the three."""
    assert (openai_image(1024, 1024), openai_image(2048, 4096)) == (765, 1105)
    assert abs(anthropic_image(1092, 1092) - 1590) <= 1
    assert gemini_image(384, 200) == 258
    for w, h in ((1024, 1024), (2048, 4096), (300, 200), (5000, 100)):
        assert image_tokens(w, h) == max(openai_image(w, h), anthropic_image(w, h), gemini_image(w, h))


def test_images_audio_and_files_are_never_zero():
    remote = estimate_tokens(image_message("https://example.com/cat.png")) - BASE
    low = estimate_tokens(image_message("https://example.com/cat.png", detail="low")) - BASE
    broken = estimate_tokens(image_message("data:image/png;base64,!!!not-base64")) - BASE
    assert (remote, low, broken) == (IMAGE_MAX, IMAGE_LOW, IMAGE_MAX)

    def audio(seconds: float) -> int:
        data = base64.b64encode(b"\0" * int(32_000 * seconds)).decode()
        return estimate_tokens([{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]) - BASE
    assert 0 < audio(0.01) < audio(5) < audio(60)
    assert audio(60) >= 60 * 32  # a minute at the highest published rate, at least

    pdf = b"%PDF-1.4\n" + b"".join(b"<< /Type /Page /Parent 2 0 R >>\n" for _ in range(3)) + b"<< /Type /Pages >>"
    file_part = {"type": "file", "file": {"filename": "a.pdf", "file_data": data_url(pdf, "application/pdf")}}
    assert estimate_tokens([{"role": "user", "content": [file_part]}]) - BASE == 3 * PDF_PER_PAGE
    unknown = estimate_tokens([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}])
    assert unknown - BASE >= IMAGE_LOW


def provider(name: str, **options):
    cfg = DeploymentConfig(alias="a", provider=name, model="m", base_url="http://127.0.0.1:9/v1", options=options)
    return registry.get(name)(cfg, ProviderContext(get_secret=lambda _n: "k"))


TEXT = "Tokenization of antidisestablishmentarianism, naïvely: 12345 tokens?"


@pytest.mark.parametrize("name", ["openai_compatible", "vllm", "azure_openai", "gemini", "bedrock", "anthropic"])
def test_a_deployments_own_tokenizer_counts_its_text_exactly(name):
    reference = Tokenizer.from_file(str(TOKENIZER))
    reference.no_truncation()  # the shipped file pads and cuts at 128 for the embedder
    reference.no_padding()
    exact = len(reference.encode(TEXT, add_special_tokens=False).ids)
    assert 0 < exact < 128
    counted = provider(name, tokenizer=str(TOKENIZER)).count_tokens([{"role": "user", "content": TEXT}])
    assert counted == exact + BASE
    assert provider(name).count_tokens([{"role": "user", "content": TEXT}]) != counted  # chars/4 differs here
    with_image = provider(name, tokenizer=str(TOKENIZER)).count_tokens(
        [{"role": "user", "content": [{"type": "text", "text": TEXT},
                                      {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    assert with_image == exact + IMAGE_MAX + BASE


def test_a_tokenizer_files_truncation_and_padding_do_not_cap_or_pad_the_count():
    """Regression guard: the shipped tokenizer.json truncates and pads to 128 pieces for the embedder; a
    count read through it came out 128 for any text."""
    p = provider("vllm", tokenizer=str(TOKENIZER))
    short = p.count_tokens([{"role": "user", "content": "hi"}]) - BASE
    long = p.count_tokens([{"role": "user", "content": "word " * 1000}]) - BASE
    assert short == 1 and long == 1000


def test_a_tokenizer_that_cannot_be_loaded_is_a_config_error_naming_it(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    for path in (broken, tmp_path / "missing.json"):
        with pytest.raises(ConfigError, match="options.tokenizer") as exc:
            provider("vllm", tokenizer=str(path)).count_tokens([{"role": "user", "content": "hi"}])
        assert str(path) in exc.value.detail
