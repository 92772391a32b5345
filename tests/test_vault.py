"""Secrets vault: encrypted at rest; no response body or log line ever carries a secret's value."""

import os
import stat
import subprocess
import sys

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.store

SECRET_CHARS = st.characters(min_codepoint=33, max_codepoint=126)


@given(value=st.text(SECRET_CHARS, min_size=12, max_size=64), name=st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_secret_never_in_responses_or_logs(server, value, name):
    bodies = []
    with server.admin() as c:
        bodies.append(c.put(f"/admin/secrets/{name}", json={"value": value}).text)
        bodies.append(c.get("/admin/secrets").text)
        bodies.append(c.put(f"/admin/secrets/{name}", json={"value": value, "extra": value}).text)
        bodies.append(c.put("/admin/secrets/bad name!", json={"value": value}).text)
        bodies.append(c.get(f"/admin/secrets/{name}").text)
        bodies.append(c.post("/admin/teams", content=value.encode(), headers={"content-type": "application/json"}).text)
        bodies.append(c.get("/v1/me").text)
    for body in bodies:
        assert value not in body
    assert value not in server.logs()


def test_secret_encrypted_at_rest_and_survives_restart(server_factory, db_url):
    srv = server_factory()
    value = "sk-live-" + "Z" * 30
    with srv.admin() as c:
        assert c.put("/admin/secrets/openai", json={"value": value}).status_code == 200
        names = c.get("/admin/secrets").json()["data"]
        assert [n["name"] for n in names] == ["openai"]
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        blob = conn.execute(sa.text("SELECT ciphertext FROM secrets")).scalar()
    engine.dispose()
    assert value.encode() not in bytes(blob)
    srv.stop()
    srv2 = server_factory()
    with srv2.admin() as c:
        assert c.delete("/admin/secrets/openai").status_code == 204
        assert c.delete("/admin/secrets/openai").status_code == 404


def test_master_key_file_created_0600(tmp_path, db_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update({"KEEL_DATA_DIR": str(tmp_path), "KEEL_DATABASE_URL": db_url})
    out = subprocess.run([sys.executable, "-m", "keel", "db", "upgrade"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    from keel.core.settings import Settings
    from keel.identity.vault import load_master_key

    key = load_master_key(None, tmp_path)
    mode = stat.S_IMODE((tmp_path / "master.key").stat().st_mode)
    assert mode == 0o600 and load_master_key(None, tmp_path) == key
    assert Settings().data_dir.name == ".keel"


def test_existing_secrets_become_global_and_never_header_secrets(db_url):
    """Guards the secret-owner migration: a secret stored before owners existed becomes global and serves
    provider and webhook (its value never leaves Keel through either), never an outbound header."""
    from alembic import command
    from cryptography.fernet import Fernet

    from keel.core.db import Store
    from keel.identity.vault import SecretNotAllowed, Vault

    store = Store.open(db_url)
    cfg = store._alembic_config()
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "id_0001")
    vault_key = Fernet.generate_key()
    token = Fernet(vault_key).encrypt(b"old-provider-key")
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO secrets (name, ciphertext, created_at, updated_at) "
                             "VALUES ('legacy', :t, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"t": token})
    store.upgrade()
    vault = Vault(store, vault_key)
    [row] = vault.names()
    assert (row["name"], row["team_id"], row["uses"], row["grants"]) == ("legacy", None, ["provider", "webhook"], [])
    assert vault.get("legacy") == "old-provider-key"
    assert vault.resolve("legacy", None, "webhook") == "old-provider-key"
    with pytest.raises(SecretNotAllowed):
        vault.resolve("legacy", None, "http_header")
    store.dispose()


def test_cli_sets_owner_and_uses_grants_and_revokes(server):
    """Guards `keel secrets set NAME --team T --use U`, `grant` and `revoke`, and a builder's own team's
    secrets through the same commands; no command prints a value."""
    env = {**server.env, "KEEL_URL": server.url, "KEEL_API_KEY": server.admin_key}

    def keel(*args, key=None):
        e = dict(env, KEEL_API_KEY=key) if key else env
        return subprocess.run([sys.executable, "-m", "keel", "secrets", *args], env=e, capture_output=True,
                              text=True, timeout=60)

    with server.admin() as c:
        team = c.post("/admin/teams", json={"name": "ops"}).json()["id"]
        builder = c.post("/admin/keys", json={"role": "builder", "team": "ops"}).json()["key"]
    out = keel("set", "hook-key", "--value", "hook-value-0123456789", "--use", "webhook", "--use", "http_header")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[2:] == ["global", "http_header,webhook"] and "hook-value" not in out.stdout
    out = keel("set", "ops-key", "--value", "ops-value-0123456789", "--team", "ops", "--use", "provider")
    assert out.returncode == 1 and "provider credential" in out.stderr
    assert keel("grant", "hook-key", "--team", "ops", "--use", "http_header").returncode == 0
    listed = keel("list").stdout
    assert f"{team}:http_header" in listed and "hook-value" not in listed
    mine = keel("list", key=builder).stdout
    assert "hook-key" in mine
    assert keel("set", "own-key", "--value", "own-value-0123456789", key=builder).returncode == 0
    assert keel("delete", "hook-key", key=builder).returncode == 1
    assert keel("revoke", "hook-key", "--team", "ops", "--use", "http_header").returncode == 0
    assert "hook-key" not in keel("list", key=builder).stdout
    assert "own-key" in keel("list", key=builder).stdout
    with server.admin() as c:
        r = c.delete(f"/admin/teams/{team}")
        assert r.status_code == 409  # it still has active keys (and owns a secret)


PASSPHRASE = "correct horse battery staple"


def _legacy_key(passphrase: str) -> bytes:
    """The key earlier versions made from KEEL_MASTER_KEY: one SHA-256 of the passphrase."""
    import base64
    import hashlib

    return base64.urlsafe_b64encode(hashlib.sha256(passphrase.encode()).digest())


def _ciphertext(store, name: str) -> bytes:
    with store.engine.connect() as conn:
        return bytes(conn.execute(sa.text("SELECT ciphertext FROM secrets WHERE name = :n"), {"n": name}).scalar())


def test_a_passphrase_is_stretched_by_scrypt_with_a_salt_per_installation(db_url, tmp_path):
    """Guards KEEL_MASTER_KEY: the passphrase goes through a memory-hard KDF (scrypt, >= 16 MiB) with a
    salt kept in the database, so replicas with their own data dirs derive the same key, another
    installation with the same passphrase a different one, and no single SHA-256 opens a value."""
    from cryptography.fernet import Fernet, InvalidToken

    from keel.core.db import Store
    from keel.identity.vault import Vault, load_master_key

    store = Store.open(db_url)
    store.upgrade()
    one = Vault(store, load_master_key(PASSPHRASE, tmp_path / "replica-1"))
    one.put("crm", "crm-value-0123456789", uses=["webhook"])
    two = Vault(store, load_master_key(PASSPHRASE, tmp_path / "replica-2"))
    assert two.resolve("crm", None, "webhook") == "crm-value-0123456789"
    token = _ciphertext(store, "crm")
    with pytest.raises(InvalidToken):
        Fernet(_legacy_key(PASSPHRASE)).decrypt(token)
    with store.engine.connect() as conn:
        kdf = conn.execute(sa.text("SELECT algorithm, salt, n, r, p FROM vault_kdf")).one()
    assert kdf.algorithm == "scrypt" and len(bytes(kdf.salt)) >= 16 and 128 * kdf.r * kdf.n >= 16 * 2**20

    other = Store.open(f"sqlite:///{tmp_path / 'other.db'}")
    other.upgrade()
    with other.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO secrets (name, ciphertext, team_id, uses, created_at, updated_at) VALUES "
                             "('crm', :t, NULL, '[\"webhook\"]', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"t": token})
    from keel.core.errors import ConfigError

    with pytest.raises(ConfigError):
        Vault(other, load_master_key(PASSPHRASE, tmp_path / "other")).resolve("crm", None, "webhook")
    other.dispose()
    store.dispose()


def test_secrets_sealed_with_the_legacy_sha256_key_still_open_and_are_resealed(db_url, tmp_path):
    """Guards upgrades of installations with KEEL_MASTER_KEY: a value sealed with the old SHA-256 key still
    opens, and reading it (as every start does for the log scrubber) reseals it under the scrypt key."""
    from cryptography.fernet import Fernet, InvalidToken

    from keel.core.db import Store
    from keel.identity.vault import Vault, load_master_key

    store = Store.open(db_url)
    store.upgrade()
    with store.engine.begin() as conn:
        for name, value in (("openai", b"sk-old-provider-key"), ("hook", b"old-webhook-secret")):
            conn.execute(sa.text("INSERT INTO secrets (name, ciphertext, team_id, uses, created_at, updated_at) "
                                 "VALUES (:n, :t, NULL, '[\"provider\", \"webhook\"]', CURRENT_TIMESTAMP, "
                                 "CURRENT_TIMESTAMP)"), {"n": name, "t": Fernet(_legacy_key(PASSPHRASE)).encrypt(value)})
    vault = Vault(store, load_master_key(PASSPHRASE, tmp_path))
    assert vault.get("openai") == "sk-old-provider-key"
    vault.prime_redactor()
    for name in ("openai", "hook"):
        with pytest.raises(InvalidToken):
            Fernet(_legacy_key(PASSPHRASE)).decrypt(_ciphertext(store, name))
    fresh = Vault(store, load_master_key(PASSPHRASE, tmp_path / "elsewhere"))
    assert fresh.get("openai") == "sk-old-provider-key"
    assert fresh.resolve("hook", None, "webhook") == "old-webhook-secret"
    store.dispose()


def test_a_server_started_on_a_legacy_vault_reseals_it(server_factory, db_url, tmp_path):
    """Guards the upgrade on a real start: secrets stored by an older Keel under KEEL_MASTER_KEY are resealed
    with the scrypt key when the server starts (before any request)."""
    from cryptography.fernet import Fernet, InvalidToken

    from conftest import MASTER_KEY
    from keel.core.db import Store
    from keel.identity.vault import Vault, load_master_key

    store = Store.open(db_url)
    store.upgrade()
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO secrets (name, ciphertext, team_id, uses, created_at, updated_at) "
                             "VALUES ('legacy', :t, NULL, '[\"provider\"]', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"),
                     {"t": Fernet(_legacy_key(MASTER_KEY)).encrypt(b"legacy-value-0123456789")})
    server_factory().stop()
    with pytest.raises(InvalidToken):
        Fernet(_legacy_key(MASTER_KEY)).decrypt(_ciphertext(store, "legacy"))
    assert Vault(store, load_master_key(MASTER_KEY, tmp_path / "check")).get("legacy") == "legacy-value-0123456789"
    store.dispose()
