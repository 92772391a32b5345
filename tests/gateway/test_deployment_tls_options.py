"""A deployment's own TLS files (`ca_bundle`, `client_cert`, `client_key` options) are checked when it is
defined: through `POST`/`PUT /admin/deployments` a bad one is the caller's 422 naming the option and the file
(it used to be accepted, and every later call to the deployment answered 500 `config_error`); in keel.yaml it
stops the start with a ConfigError naming the deployment and the option."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import MASTER_KEY, start_server
from tests.fakes.tls import PKI, make_pki

pytestmark = pytest.mark.store


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def bad_cells(pki: PKI) -> list[tuple[str, dict[str, Any], str, str]]:
    """(name, options, the option the error must name, a text it must contain: the file or the rule)."""
    folder = pki.ca.parent
    garbage = folder / "garbage.pem"
    garbage.write_text("not a certificate\n")
    missing = str(folder / "nowhere.pem")
    return [
        ("missing CA bundle", {"ca_bundle": missing}, "ca_bundle", missing),
        ("CA bundle is a folder", {"ca_bundle": str(folder)}, "ca_bundle", str(folder)),
        ("CA bundle is not PEM", {"ca_bundle": str(garbage)}, "ca_bundle", str(garbage)),
        ("CA bundle not a path", {"ca_bundle": 123}, "ca_bundle", "path"),
        ("missing client certificate", {"client_cert": missing, "client_key": str(pki.client_key)},
         "client_cert", missing),
        ("missing client key", {"client_cert": str(pki.client_cert), "client_key": missing}, "client_key", missing),
        ("certificate without its key", {"client_cert": str(pki.client_cert)}, "client_cert", str(pki.client_cert)),
        ("key that is not the certificate's", {"client_cert": str(pki.server_cert), "client_key": str(pki.client_key)},
         "client_cert", str(pki.server_cert)),
        ("key without a certificate", {"client_key": str(pki.client_key)}, "client_key", str(pki.client_key)),
    ]


@pytest.fixture(scope="module")
def srv(module_server_factory):
    return module_server_factory()


def deployment(name: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"alias": f"tls-{name}", "provider": "openai_compatible", "model": "m",
            "base_url": "https://127.0.0.1:9/v1", "options": options}


def test_bad_tls_options_are_a_422_naming_the_option_and_the_file(srv, pki):
    with srv.admin() as admin:
        for i, (name, options, option, named) in enumerate(bad_cells(pki)):
            r = admin.post("/admin/deployments", json=deployment(str(i), options))
            assert r.status_code == 422, (name, r.status_code, r.text)
            body = r.json()
            assert body["code"] == "validation_error" and body["option"] == option, (name, body)
            assert f"options.{option}" in body["detail"] and named in body["detail"], (name, body["detail"])
            assert body["fix"], name
        listed = [d["alias"] for d in admin.get("/admin/deployments").json()["data"]]
        assert not [a for a in listed if a.startswith("tls-")]  # nothing refused was stored

        good = {"ca_bundle": str(pki.ca), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
        r = admin.post("/admin/deployments", json=deployment("good", good))
        assert r.status_code == 201, r.text
        did = r.json()["id"]
        r = admin.put(f"/admin/deployments/{did}", json={"options": {**good, "ca_bundle": str(pki.ca.parent / "x")}})
        assert r.status_code == 422 and r.json()["option"] == "ca_bundle", r.text


def test_a_keel_yaml_deployment_with_bad_tls_options_stops_the_start(tmp_path, db_url, pki):
    from keel.core.db import Store
    from keel.core.errors import ConfigError
    from keel.core.settings import DeploymentConfig, Settings
    from keel.gateway.deployments import Deployments
    from keel.gateway.protocol import ProviderContext

    store = Store.open(db_url)
    store.upgrade()
    try:
        for name, options, option, named in bad_cells(pki):
            cfg = DeploymentConfig(alias="tls", provider="openai_compatible", model="m",
                                   base_url="https://127.0.0.1:9/v1", options=options)
            settings = Settings(data_dir=tmp_path / "data", database_url=db_url, embedded_models=False, models=[cfg])
            with pytest.raises(ConfigError) as exc:
                Deployments(store, settings, ProviderContext(get_secret=lambda _name: None))
            assert f"options.{option}" in exc.value.detail and named in exc.value.detail, (name, exc.value.detail)
            assert "tls/" in exc.value.detail and exc.value.fix, name
    finally:
        store.dispose()

    config = tmp_path / "keel.yaml"
    config.write_text(f"""
models:
  - {{alias: corp, provider: openai_compatible, model: m, base_url: "https://127.0.0.1:9/v1",
      options: {{ca_bundle: {tmp_path / "nowhere.pem"}}}}}
""")
    keel = start_server(tmp_path / "serve", db_url, config=config, wait=False, KEEL_MASTER_KEY=MASTER_KEY)
    assert keel.proc.wait(timeout=120) != 0  # stopped before the port was bound
    assert "options.ca_bundle" in keel.logs() and "nowhere.pem" in keel.logs() and "Traceback" not in keel.logs()
