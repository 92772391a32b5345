"""`/v1/answer` end to end with the bundled local chat model (SmolLM2 via llama.cpp), offline."""

import pytest

from .conftest import upload

pytestmark = [pytest.mark.store, pytest.mark.slow]


def test_local_model_answers_with_citations(ksrv):
    with ksrv.admin() as a:
        a.post("/v1/collections", json={"name": "faq", "classification": "public"})
        upload(a, "faq", {"wifi.md": b"# Wi-Fi\n\nThe office Wi-Fi network is called keel-guest; the password is "
                                      b"printed at reception.\n"})
        r = a.post("/v1/answer", json={"question": "What is the office Wi-Fi network called?",
                                       "collections": ["faq"], "top_k": 1, "max_tokens": 24}, timeout=180)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["found"] and body["answer"].strip() and body["model"] == "local-chat"
    assert body["citations"][0]["source"] == "wifi.md" and body["usage"]["completion_tokens"] > 0
