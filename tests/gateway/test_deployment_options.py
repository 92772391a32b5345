"""A deployment's provider options are checked when it is defined, by the provider's own `check_options`:
through `POST`/`PUT /admin/deployments` a mistake is the caller's 422 naming the option and a fix (it used
to be accepted, and every later call to the deployment answered 500 `config_error`); in keel.yaml it stops
the start with a ConfigError naming the deployment and the option, before the port binds."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from conftest import MASTER_KEY, start_server

pytestmark = pytest.mark.store


def bad_cells(folder: Path) -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, deployment fields, the field the error must name, a text the detail must contain)."""
    missing = str(folder / "nowhere" / "tokenizer.json")
    garbage = folder / "garbage.json"
    garbage.write_text("not a tokenizer\n")
    empty_dir = folder / "empty-model"
    empty_dir.mkdir(exist_ok=True)
    azure = {"provider": "azure_openai", "model": "gpt-4o", "base_url": "https://r.openai.azure.com"}
    return [
        ("azure bad auth", {**azure, "options": {"auth": "password"}}, "options.auth", "password"),
        ("azure no endpoint", {**azure, "base_url": None}, "base_url", "endpoint"),
        ("azure token_refresh_s", {**azure, "options": {"auth": "entra", "token_refresh_s": "soon"}},
         "options.token_refresh_s", "token_refresh_s"),
        ("missing tokenizer", {"provider": "openai_compatible", "model": "m", "options": {"tokenizer": missing}},
         "options.tokenizer", missing),
        ("tokenizer not a tokenizer", {"provider": "groq", "model": "m", "options": {"tokenizer": str(garbage)}},
         "options.tokenizer", str(garbage)),
        ("tokenizer not a path", {"provider": "gemini", "model": "m", "options": {"tokenizer": 7}},
         "options.tokenizer", "path"),
        ("bedrock without model", {"provider": "bedrock", "options": {"region": "eu-west-1"}}, "model", "bedrock"),
        ("bedrock bad region", {"provider": "bedrock", "model": "anthropic.claude-3-5-haiku-20241022-v1:0",
                                "options": {"region": "Europe/Paris"}}, "options.region", "Europe/Paris"),
        ("local_rerank without path", {"provider": "local_rerank", "kind": "rerank"}, "path", "path"),
        ("local_rerank empty folder", {"provider": "local_rerank", "kind": "rerank", "path": str(empty_dir)},
         "path", str(empty_dir)),
        ("local_rerank activation", {"provider": "local_rerank", "kind": "rerank", "path": str(empty_dir),
                                     "options": {"activation": "tanh"}}, "options.activation", "tanh"),
        ("rerank_api path", {"provider": "rerank_api", "kind": "rerank", "model": "r",
                             "base_url": "http://127.0.0.1:9", "options": {"path": 5}}, "options.path", "path"),
    ]


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory()


def test_bad_provider_options_are_a_422_naming_the_field(srv, tmp_path):
    with srv.admin() as admin:
        for i, (name, fields, field, named) in enumerate(bad_cells(tmp_path)):
            r = admin.post("/admin/deployments", json={"alias": f"opt-{i}", **fields})
            assert r.status_code == 422, (name, r.status_code, r.text)
            body = r.json()
            assert body["code"] == "validation_error" and body["option"] == field, (name, body)
            assert field in body["detail"] and named in body["detail"], (name, body["detail"])
            assert body["fix"], name
        r = admin.post("/admin/deployments", json={"alias": "opt-preset", "provider": "grok", "model": "m"})
        assert r.status_code == 422 and "grok" in r.json()["detail"] and "groq" in r.json()["fix"], r.text
        listed = [d["alias"] for d in admin.get("/admin/deployments").json()["data"]]
        assert not [a for a in listed if a.startswith("opt-")]  # nothing refused was stored

        good = {"alias": "opt-good", "provider": "azure_openai", "model": "gpt-4o",
                "base_url": "https://r.openai.azure.com", "options": {"auth": "entra"}}
        r = admin.post("/admin/deployments", json=good)
        assert r.status_code == 201, r.text
        did = r.json()["id"]
        r = admin.put(f"/admin/deployments/{did}", json={"options": {"auth": "basic"}})
        assert r.status_code == 422 and r.json()["option"] == "options.auth", r.text
        assert admin.get("/admin/deployments").status_code == 200


def test_a_keel_yaml_deployment_with_bad_options_stops_the_start(tmp_path, db_url):
    from keel.core.db import Store
    from keel.core.errors import ConfigError
    from keel.core.settings import DeploymentConfig, Settings
    from keel.gateway.deployments import Deployments
    from keel.gateway.protocol import ProviderContext

    store = Store.open(db_url)
    store.upgrade()
    try:
        for name, fields, field, named in bad_cells(tmp_path):
            cfg = DeploymentConfig(alias="opt", **fields)
            settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False, models=[cfg])
            with pytest.raises(ConfigError) as exc:
                Deployments(store, settings, ProviderContext(get_secret=lambda _name: None))
            assert field in exc.value.detail and named in exc.value.detail, (name, exc.value.detail)
            assert "opt/" in exc.value.detail and "keel.yaml" in exc.value.detail and exc.value.fix, name
    finally:
        store.dispose()

    config = tmp_path / "keel.yaml"
    config.write_text("""
models:
  - {alias: az, provider: azure_openai, model: gpt-4o, base_url: "https://r.openai.azure.com",
     options: {auth: password}}
""")
    keel = start_server(tmp_path / "serve", db_url, config=config, wait=False, KEEL_MASTER_KEY=MASTER_KEY)
    assert keel.proc.wait(timeout=120) != 0  # stopped before the port was bound
    assert "options.auth" in keel.logs() and "password" in keel.logs() and "Traceback" not in keel.logs()
    port = int(keel.url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing holds it
