"""Identity: teams, users, keys (shown once, hashed, scoped, expiring, revocable), roles."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from conftest import Clock, eventually, eventually_async

pytestmark = pytest.mark.store


def test_key_lifecycle_create_use_revoke(server):
    with server.admin() as admin:
        team = admin.post("/admin/teams", json={"name": "sales"}).json()
        created = admin.post("/admin/keys", json={"name": "bot", "role": "member", "team": "sales"})
        assert created.status_code == 201
        key = created.json()["key"]
        assert key.startswith("sk-keel-") and created.json()["team_id"] == team["id"]
        listed = admin.get("/admin/keys").json()["data"]
        assert all("key" not in k and "key_hash" not in k for k in listed)
        assert any(key.startswith(k["prefix"]) for k in listed)
        with server.client(key) as c:
            me = c.get("/v1/me").json()
            assert me["role"] == "member" and me["team_id"] == team["id"]
            assert admin.post(f"/admin/keys/{created.json()['id']}/revoke").status_code == 200
            r = c.get("/v1/me")
            assert r.status_code == 401 and r.json()["code"] == "unauthorized"
            assert "revoked" in r.json()["detail"]


def test_key_is_stored_only_as_hash(server, db_url):
    with server.admin() as admin:
        key = admin.post("/admin/keys", json={"role": "member"}).json()["key"]
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT prefix, key_hash FROM api_keys")).all()
    engine.dispose()
    assert all(key not in (r.prefix + r.key_hash) for r in rows)


def test_wrong_missing_and_expired_keys_get_401(server):
    with server.client("sk-keel-000000000000_" + "x" * 30) as c:
        assert c.get("/v1/me").status_code == 401
    with server.client("garbage") as c:
        assert c.get("/v1/me").status_code == 401
    with server.client() as c:
        assert c.get("/admin/teams").status_code == 401
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    with server.admin() as admin:
        key = admin.post("/admin/keys", json={"role": "member", "expires_at": soon}).json()["key"]
        past = admin.post("/admin/keys", json={"role": "member", "expires_at": "2001-01-01T00:00:00Z"})
        assert past.status_code == 400

    def refused():
        with server.client(key) as c:
            r = c.get("/v1/me")
        return r if r.status_code == 401 else None
    r = eventually(refused, timeout=10)  # served until it expires 1.5 s from now, then refused
    assert "expired" in r.json()["detail"]


@pytest.mark.parametrize("role", ["builder", "member", "reviewer", "auditor"])
def test_non_admin_roles_get_403_on_admin_api(server, role):
    with server.admin() as admin:
        key = admin.post("/admin/keys", json={"role": role}).json()["key"]
    with server.client(key) as c:
        for method, path in [("GET", "/admin/teams"), ("POST", "/admin/keys"), ("GET", "/admin/secrets"),
                             ("PUT", "/admin/secrets/x")]:
            r = c.request(method, path, json={"role": "admin"} if method == "POST" else {"value": "v"})
            assert r.status_code == 403, (role, path, r.text)
            assert r.json()["code"] == "forbidden"


def test_unknown_role_and_duplicate_team_are_clear(server):
    with server.admin() as admin:
        r = admin.post("/admin/keys", json={"role": "superuser"})
        assert r.status_code == 400 and "admin, builder" in r.json()["fix"]
        assert admin.post("/admin/teams", json={"name": "ops"}).status_code == 201
        r = admin.post("/admin/teams", json={"name": "ops"})
        assert r.status_code == 409 and r.json()["code"] == "conflict"
        assert admin.post("/admin/users", json={"email": "a@x.io", "role": "member", "team": "ops"}).status_code == 201
        assert admin.get("/admin/teams/nope").status_code == 404


def test_cli_keys_create_list_revoke(server):
    env = {**server.env, "KEEL_URL": server.url, "KEEL_API_KEY": server.admin_key}

    def keel(*args):
        return subprocess.run([sys.executable, "-m", "keel", *args], env=env, capture_output=True, text=True,
                              timeout=60)

    out = keel("teams", "create", "support")
    assert out.returncode == 0, out.stderr
    out = keel("keys", "create", "--name", "cli", "--role", "member", "--team", "support", "--models", "local-chat")
    assert out.returncode == 0, out.stderr
    key_id, key = out.stdout.split()[0], out.stdout.split()[1]
    assert key.startswith("sk-keel-")
    assert key_id in keel("keys", "list").stdout
    assert keel("keys", "revoke", key_id).returncode == 0
    with server.client(key) as c:
        assert c.get("/v1/me").status_code == 401
    bad = keel("keys", "revoke", "key_nope")
    assert bad.returncode == 1 and "error [not_found]" in bad.stderr and "Traceback" not in bad.stderr
    down = subprocess.run([sys.executable, "-m", "keel", "teams", "list"], capture_output=True, text=True,
                          env={**env, "KEEL_URL": "http://127.0.0.1:1"}, timeout=60)
    assert down.returncode == 1 and "cannot reach Keel" in down.stderr


def test_keys_in_use_are_reverified_off_the_request_path(tmp_path, db_url, monkeypatch):
    """Performance guard with revocation intact: keys used recently are re-verified in the background,
    all in one store query, so a request after a pause longer than the TTL does not wait on the store;
    another replica's revocation is still seen within the TTL; an entry the store could not re-check is
    not served past its TTL; a key unused for `keep_s` is forgotten and looked up again."""
    import asyncio
    import threading

    from keel.core.db import Store
    from keel.core.errors import Unauthorized
    from keel.identity import auth as auth_module
    from keel.identity import service as identity

    store = Store.open(db_url)
    store.upgrade()
    key1, rec1 = identity.create_key(store, role="member")
    key2, _ = identity.create_key(store, role="member")
    gate = threading.Event()
    gate.set()
    lookups: list[str] = []
    batches: list[list[str]] = []
    one, many = auth_module.verify_key, auth_module.verify_keys

    def verify_key(store_, key_):
        lookups.append(key_)
        assert gate.wait(10)
        return one(store_, key_)

    def verify_keys(store_, keys_):
        batches.append(sorted(keys_))
        assert gate.wait(10)
        return many(store_, keys_)

    monkeypatch.setattr(auth_module, "verify_key", verify_key)
    monkeypatch.setattr(auth_module, "verify_keys", verify_keys)
    clock = Clock()  # the TTLs and keep_s run on it; the refresher re-checks every TTL/2 of real time
    auth = auth_module.Authenticator(store, ttl_s=1.0, keep_s=2.0, clock=clock)

    async def main() -> None:
        assert (await auth.authenticate(key1)).key_id == rec1["id"]  # first use: looked up
        await auth.authenticate(key2)
        await auth.authenticate(key1)
        assert len(lookups) == 2  # fresh: no lookup
        rounds = len(batches)
        clock.now += 1.5  # the subject: a pause of one and a half TTLs, the refresher running meanwhile
        await eventually_async(lambda: all(entry[0] > clock.now for entry in auth._cache.values()), timeout=10)
        assert len(batches) > rounds
        await auth.authenticate(key1)
        await auth.authenticate(key2)
        assert len(lookups) == 2, "a request after a pause waited on the store"
        assert batches and all(b == sorted([key1, key2]) for b in batches)  # both keys, one query a round

        identity.revoke_key(store, rec1["id"])  # as another replica would: straight in the store
        clock.now += 1.0  # a TTL later, re-checked by the refresher or not, the revocation is seen
        with pytest.raises(Unauthorized, match="revoked"):
            await auth.authenticate(key1)
        assert key1 not in auth._cache

        gate.clear()  # the store stops answering: key2's entry runs out a TTL after its last check
        clock.now += 1.2  # the subject: more than a TTL passes with the store silent
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(auth.authenticate(key2)), 0.2)
        gate.set()
        await auth.authenticate(key2)

        looked = len(lookups)
        clock.now += 2.5  # key2 unused for longer than keep_s (2 s): forgotten, and the refresher stops
        await eventually_async(lambda: auth._cache == {} and auth._refresher.done(), timeout=10)
        await auth.authenticate(key2)
        assert len(lookups) == looked + 1
        await auth.close()

    asyncio.run(main())
    store.dispose()


PRINCIPALS = [
    ("admin", dict(key_id="key_a", role="admin")),
    ("scoped", dict(key_id="key_b", role="builder", team_id="team_1", user_id="usr_1", key_name="ci",
                    scopes={"models": ["small", "*"], "collections": [], "agents": None})),
    ("system", dict(key_id="system", role="member", key_name="workflow lead_intake")),
]


@pytest.mark.parametrize("name,fields", PRINCIPALS, ids=[n for n, _ in PRINCIPALS])
def test_principal_round_trips_through_to_dict_and_from_dict(name, fields):
    """Guards the one serialisation of a principal (stored in workflow runs and knowledge jobs): what
    `to_dict` writes, `from_dict` reads back equal, through JSON."""
    import json

    from keel.identity.principal import Principal, Scopes

    p = Principal(**{**fields, "scopes": Scopes.from_dict(fields.get("scopes"))})
    d = json.loads(json.dumps(p.to_dict()))
    assert Principal.from_dict(d) == p
    assert d == Principal.from_dict(d).to_dict()


def test_principal_from_dict_reads_rows_stored_before_it_existed():
    """Guards stored runs and ingest jobs: the dicts written by the hand-made copies (with and without
    `key_name`, scopes absent) still load."""
    from keel.identity.principal import Principal, Scopes

    run_row = {"key_id": "key_1", "role": "builder", "team_id": "team_1", "user_id": None, "key_name": "ci",
               "scopes": {"models": ["m"], "collections": None, "agents": None}}
    job_row = {"key_id": "key_2", "role": "member", "team_id": None, "user_id": "usr_2",
               "scopes": {"models": None, "collections": ["docs"], "agents": None}}
    assert Principal.from_dict(run_row) == Principal(key_id="key_1", role="builder", team_id="team_1", key_name="ci",
                                                     scopes=Scopes(models=("m",)))
    assert Principal.from_dict(job_row) == Principal(key_id="key_2", role="member", user_id="usr_2",
                                                     scopes=Scopes(collections=("docs",)))
    assert Principal.from_dict({"key_id": "key_3", "role": "auditor"}).scopes == Scopes()


@pytest.mark.parametrize("bad,field", [
    ("not a dict", "principal"),
    ({"role": "admin"}, "key_id"),
    ({"key_id": "", "role": "admin"}, "key_id"),
    ({"key_id": "k", "role": "root"}, "role"),
    ({"key_id": "k", "role": "admin", "team_id": 7}, "team_id"),
    ({"key_id": "k", "role": "admin", "key_name": None}, "key_name"),
    ({"key_id": "k", "role": "admin", "extra_power": True}, "extra_power"),
    ({"key_id": "k", "role": "admin", "scopes": ["models"]}, "scopes"),
    ({"key_id": "k", "role": "admin", "scopes": {"models": "gpt"}}, "scopes.models"),
    ({"key_id": "k", "role": "admin", "scopes": {"models": [1]}}, "scopes.models"),
    ({"key_id": "k", "role": "admin", "scopes": {"tools": []}}, "scopes.tools"),
])
def test_principal_from_dict_refuses_a_bad_dict_naming_the_field(bad, field):
    """Guards authority read back from storage: a dict that does not load raises InvalidPrincipal naming
    the field, never a bare KeyError or a principal with a field silently dropped (an unknown field could
    be a restriction this version does not know)."""
    from keel.identity.principal import InvalidPrincipal, Principal

    with pytest.raises(InvalidPrincipal) as info:
        Principal.from_dict(bad)
    assert info.value.ids["field"] == field and field in info.value.detail
