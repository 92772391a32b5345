"""The console's admin pages for the gateway and governance — budgets, rate limits, deployments (with their
circuit state), the policy (versions, diff, draft check) and guard events — in a real browser against the real
server on loopback: the admin does one task on each page and the API sees its effect; a builder and a member get
the not-allowed page; every page passes axe at 1280 and 390 px with no console error or failed request."""

from __future__ import annotations

import httpx
import pytest

from keel.console.charts import workflow_graph
from keel.console.pages_policy import diff
from keel.governance.policy.model import DEFAULT_POLICY
from tests.console.browser import WIDTHS, Visit
from tests.fakes.openai_upstream import FakeOpenAI
from conftest import eventually

pytestmark = pytest.mark.timeout(240)

TRIAGE = """
name: triage
inputs: {type: object, properties: {seats: {type: integer}}}
steps:
  - {id: size, type: condition, if: "inputs.seats > 100", then: sales_ok, else: reply}
  - {id: sales_ok, type: approval, approvers: [reviewer, admin]}
  - {id: escalate, type: notify, email: "boss@example.com", when: "inputs.seats > 1000"}
  - {id: reply, type: transform, output: "thanks <b>"}
"""
UPSTREAM_KEY = "sk-upstream-only-in-the-vault-42"
ADMIN_PAGES = ("/console/budgets", "/console/limits", "/console/deployments")
GOV_PAGES = ("/console/policy", "/console/guard-events")


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    upstream, keyed = FakeOpenAI().start(), FakeOpenAI(api_key=UPSTREAM_KEY).start()
    base = tmp_path_factory.mktemp("console-admin")
    (base / "policy.yaml").write_text(DEFAULT_POLICY)
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: fake, provider: openai_compatible, model: gpt-fake, base_url: {upstream.url},
      input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
  - {{alias: fake-embed, provider: openai_compatible, model: embed-fake, kind: embedding, base_url: {upstream.url}}}
""")
    srv = module_server_factory(config=base / "keel.yaml", KEEL_POLICY_FILE=str(base / "policy.yaml"),
                                KEEL_POLICY_RELOAD_INTERVAL_S="0.3")
    srv.extra.update(keyed=keyed, policy=base / "policy.yaml", keys={})
    try:
        with srv.admin() as admin:
            for team in ("sales", "ops"):
                assert admin.post("/admin/teams", json={"name": team}).status_code == 201
            for role, team in (("builder", "sales"), ("member", "sales"), ("builder", "ops"), ("member", None)):
                r = admin.post("/admin/keys", json={"role": role, "team": team, "name": f"{role}-{team}"})
                srv.extra["keys"][role if team == "sales" else f"{role}-{team}"] = r.json()["key"]
        with srv.client(srv.extra["keys"]["builder"]) as c:
            r = c.post("/v1/collections", json={"name": "handbook", "classification": "internal",
                                                "embedding_model": "fake-embed"})
            assert r.status_code == 201, r.text
        with srv.admin() as admin:
            r = admin.post("/v1/workflows", content=TRIAGE, headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text
        yield srv
    finally:
        srv.stop()
        upstream.stop()
        keyed.stop()


AdminVisit = Visit  # the favicon exception it once added lives in `Visit` for every browser test


def test_diff_marks_added_and_removed_lines():
    old = {"version": 1, "content": "a: 1\nb: 2\n"}
    new = {"version": 2, "content": "a: 1\nb: 3\n"}
    kinds = dict((line, kind) for kind, line in diff(old, new))
    assert kinds["-b: 2"] == "del" and kinds["+b: 3"] == "add" and kinds["--- version 1"] == "hunk"
    assert diff(old, old) == []


def test_workflow_graph_draws_branches_and_approvals():
    steps = [{"id": "size", "type": "condition", "if": "{{ inputs.seats > 100 }}", "then": "sales_ok", "else": "reply"},
             {"id": "sales_ok", "type": "approval", "approvers": ["reviewer", "admin"]},
             {"id": "escalate", "type": "notify", "when": "{{ inputs.seats > 1000 }}"},
             {"id": "<b>reply", "type": "transform"}]
    steps[0]["else"] = "<b>reply"
    svg = workflow_graph(steps)
    assert svg.count("<rect") == 4 and "n-approval" in svg and "n-condition" in svg
    assert svg.count("marker-end") == 4  # size→sales_ok (then), size→reply (else, a jump), sales_ok→escalate→reply
    assert svg.count(" V") == 1  # the one forward jump, drawn in its own lane
    assert "size then: sales_ok; size else: &lt;b&gt;reply" in svg and "<b>" not in svg
    assert "approval · reviewer, admin" in svg and "when inputs.seats &gt; 1000" in svg
    assert workflow_graph([]) == '<p class="empty">This workflow has no steps.</p>'


def test_admin_does_one_task_on_each_page(world, browser):
    v = AdminVisit(browser, world.url, WIDTHS["desktop"])
    v.sign_in_with_key(world.admin_key)
    assert v.nav()[-5:] == ["Admin: budgets", "Admin: limits", "Admin: deployments", "Policy", "Guard events"]
    admin = world.admin()

    v.open("/console/budgets")  # create, change, delete a team's budget
    v.page.get_by_label("Applies to").select_option("team")
    v.page.get_by_label("Team, key or user").fill("sales")
    v.page.get_by_label("Limit (USD)").fill("50")
    v.page.get_by_role("button", name="Create budget").click()
    assert "created: team sales, $50 per month" in v.page.get_by_role("status").inner_text()
    v.page.get_by_label("New limit for team sales month").fill("75")
    v.page.get_by_role("button", name="Save budget team sales month").click()
    assert [b["amount"] for b in admin.get("/admin/budgets").json()["data"]] == [75.0]
    v.check_accessibility()
    v.shot("budgets")
    v.page.get_by_role("button", name="Delete budget team sales month").click()
    v.page.wait_for_url("**/console/budgets")
    assert admin.get("/admin/budgets").json()["data"] == []

    v.open("/console/limits")  # a team's requests per minute
    v.page.get_by_label("Team or key").fill("sales")
    v.page.get_by_label("Requests per minute").fill("600")
    v.page.get_by_role("button", name="Set limit").click()
    assert "Limit set for team sales." in v.page.get_by_role("status").inner_text()
    assert [(x["scope"], x["rpm"]) for x in admin.get("/admin/limits").json()["data"]] == [("team", 600)]
    v.check_accessibility()
    v.shot("limits")
    v.page.get_by_role("button", name="Remove limit of team sales").click()
    v.page.wait_for_url("**/console/limits")
    assert admin.get("/admin/limits").json()["data"] == []

    v.open("/console/deployments")  # a provider with its secret: stored in the vault, shown by name only
    v.page.get_by_label("Alias").fill("keyed")
    v.page.get_by_label("Upstream model").fill("gpt-keyed")
    v.page.get_by_label("Base URL").fill(world.extra["keyed"].url)
    v.page.get_by_label("API key").fill(UPSTREAM_KEY)
    v.page.get_by_role("button", name="Add deployment").click()
    assert "Deployment keyed/openai_compatible/gpt-keyed added." in v.page.get_by_role("status").inner_text()
    assert UPSTREAM_KEY not in v.page.content()
    dep = next(d for d in admin.get("/admin/deployments").json()["data"] if d["alias"] == "keyed")
    assert dep["credential"] == "deployment-keyed-openai_compatible-gpt-keyed" and UPSTREAM_KEY not in str(dep)
    r = admin.post("/v1/chat/completions", json={"model": "keyed", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text  # the upstream accepted the key from the vault
    v.open("/console/deployments")
    row = v.page.get_by_role("row").filter(has_text="keyed/openai_compatible")
    assert "closed" in row.inner_text() and "vault: deployment-keyed" in row.inner_text()
    row.get_by_text("Change").click()
    v.page.get_by_label("Input $ per 1M of keyed/openai_compatible/gpt-keyed").fill("3")
    v.page.get_by_role("button", name="Save keyed/openai_compatible/gpt-keyed").click()
    assert "Deployment keyed/openai_compatible/gpt-keyed updated." in v.page.get_by_role("status").inner_text()
    dep = next(d for d in admin.get("/admin/deployments").json()["data"] if d["alias"] == "keyed")
    assert dep["input_price_per_1m"] == 3.0 and dep["credential"] == "deployment-keyed-openai_compatible-gpt-keyed"
    v.check_accessibility()
    v.shot("deployments")
    v.page.get_by_role("button", name="Remove deployment keyed/openai_compatible/gpt-keyed").click()
    v.page.wait_for_url("**/console/deployments")
    assert all(d["alias"] != "keyed" for d in admin.get("/admin/deployments").json()["data"])

    world.extra["policy"].write_text(DEFAULT_POLICY + "\n# reviewed by security\n")  # a second version
    eventually(lambda: len(admin.get("/admin/policy/versions").json()["data"]) == 2, timeout=30)
    v.open("/console/policy")
    v.page.get_by_role("link", name="changes from version 1").click()
    assert "+# reviewed by security" in v.page.locator(".diff").inner_text()
    v.shot("policy")
    v.page.get_by_role("button", name="Check draft").click()
    assert v.page.get_by_role("status").inner_text().startswith("Valid:")
    v.check_accessibility()
    v.expect("/console/policy/check", 400)
    v.page.get_by_label("Draft policy (YAML)").fill("classifications: 5\n")
    v.page.get_by_role("button", name="Check draft").click()
    assert v.page.get_by_role("status").inner_text().startswith("Not valid:")
    assert len(admin.get("/admin/policy/versions").json()["data"]) == 2  # checked, never stored
    v.expect("/console/policy/activate", 400)
    v.page.get_by_role("button", name="Activate draft").click()  # the invalid draft: nothing changes
    assert v.page.get_by_role("status").inner_text().startswith("Not valid:")
    assert admin.get("/admin/policy").json()["version"] == 2
    v.page.get_by_label("Draft policy (YAML)").fill(DEFAULT_POLICY.replace("name: keel-default", "name: tightened"))
    v.page.get_by_role("button", name="Activate draft").click()
    assert v.page.get_by_role("status").inner_text() == "Version 3 is now the active policy."
    assert admin.get("/admin/policy").json()["name"] == "tightened"

    r = admin.post("/v1/chat/completions", json={"model": "fake", "messages": [
        {"role": "user", "content": "deploy with sk_live_" + "Z9" * 12}]})
    assert r.status_code == 200, r.text  # the default policy redacts secrets in input
    v.open("/console/guard-events")
    v.page.get_by_label("Request id").fill(r.headers["x-request-id"])
    v.page.get_by_role("button", name="Filter").click()
    row = v.page.get_by_role("row").filter(has_text="stripe_key")
    assert row.count() == 1 and "redact" in row.inner_text() and "Z9Z9" not in v.page.content()
    v.check_accessibility()
    v.shot("guard-events")
    admin.close()
    v.close()

    phone = AdminVisit(browser, world.url, WIDTHS["phone"])
    phone.sign_in_with_key(world.admin_key)
    for path in ADMIN_PAGES + GOV_PAGES:
        phone.open(path)
        assert phone.page.get_by_role("heading", level=1).count() == 1
        phone.check_accessibility()
    phone.close()


def _session(world, key: str) -> tuple[httpx.Client, str]:
    """A console session opened with `key`, and its CSRF token."""
    c = httpx.Client(base_url=world.url, timeout=30)
    pre = c.get("/console/sign-in").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert c.post("/console/sign-in", data={"csrf": pre, "key": key}).status_code == 303
    return c, c.get("/console/guard-events").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


@pytest.mark.store
def test_collection_access_form_follows_the_api_rules(world):
    """Only the owner team's writers and admins change a collection's access, as `PATCH /v1/collections/{ref}`:
    another team's builder gets not-found (it may not read the collection), the owner team's member and a key
    without a team are refused; a malformed or oversized form is a 4xx, never a 5xx."""
    ok = {"classification": "internal", "read_teams": "", "read_roles": "member"}
    cells = {"builder-ops": 404, "member": 403, "member-None": 404, "builder": 303}
    wrong = []
    for who, want in cells.items():
        c, csrf = _session(world, world.extra["keys"][who])
        got = c.post("/console/knowledge/handbook/access", data={**ok, "csrf": csrf}).status_code
        if got != want:
            wrong.append(f"{who}: want {want}, got {got}")
        c.close()
    c, csrf = _session(world, world.admin_key)
    for form, want in (({"classification": "secret"}, 422), ({"read_teams": "no-such-team"}, 400),
                       ({"read_roles": "overlord"}, 400), ({"write_teams": "x" * 100_000}, 400),
                       ({"classification": "internal"}, 303)):
        got = c.post("/console/knowledge/handbook/access", data={**form, "csrf": csrf}).status_code
        if got != want:
            wrong.append(f"admin {form!s:.60}: want {want}, got {got}")
    got = c.post("/console/knowledge/handbook/access", data={"classification": "public"}).status_code
    if got != 403:
        wrong.append(f"admin without CSRF: got {got}")
    c.close()
    assert not wrong, "\n".join(wrong)


def test_builder_and_member_cannot_reach_the_admin_pages(world, browser):
    with world.admin() as admin:  # a guard event on the admin's key
        r = admin.post("/v1/chat/completions", json={"model": "fake", "messages": [
            {"role": "user", "content": "deploy with sk_live_" + "Q8" * 12}]})
        assert r.status_code == 200, r.text
        theirs = r.headers["x-request-id"]
        eventually(lambda: admin.get("/v1/guard-events", params={"request_id": theirs}).json()["data"], timeout=10)
    for role in ("builder", "member"):
        v = AdminVisit(browser, world.url, WIDTHS["phone"])
        v.sign_in_with_key(world.extra["keys"][role])
        assert not {"Admin: budgets", "Admin: limits", "Admin: deployments", "Policy"} & set(v.nav())
        for path in ADMIN_PAGES + ("/console/policy",):
            v.expect(path, 403)
            assert v.open(path).status == 403
            assert v.page.get_by_role("heading", level=1).inner_text() == "Not allowed"
        v.check_accessibility()
        v.open("/console/guard-events")  # as the API: the caller's own key's events only
        assert "your key's requests" in v.page.get_by_role("main").inner_text()
        v.open(f"/console/guard-events?request_id={theirs}")
        assert v.page.get_by_role("cell", name="stripe_key").count() == 0  # the admin's request's event is not theirs
        v.open("/console/knowledge/handbook")  # only the owner team's builder edits who may read
        if role == "member":
            assert v.page.get_by_role("region", name="Access").count() == 0
        else:
            v.page.get_by_label("Classification").select_option("confidential")
            v.page.get_by_label("Teams that may read (names or ids, comma-separated)").fill("ops")
            v.page.get_by_label("reviewer may read").check()
            v.page.get_by_role("button", name="Save access").click()
            assert "Access saved: confidential." in v.page.get_by_role("status").inner_text()
            v.check_accessibility()
            v.shot("collection-access")
            with world.client(world.extra["keys"]["builder"]) as c:
                got = c.get("/v1/collections/handbook").json()
            assert got["classification"] == "confidential" and got["acl"]["read"]["roles"] == ["reviewer"]
            assert len(got["acl"]["read"]["teams"]) == 1 and got["acl"]["write"] == {"teams": [], "roles": []}
        v.open("/console/workflows/triage")  # the definition drawn as a graph, branches and approval visible
        graph = v.page.get_by_role("img", name="Workflow steps")
        assert "size then: sales_ok; size else: reply" in graph.get_attribute("aria-label")
        assert graph.locator("rect.n-approval").count() == 1 and graph.locator("rect.n-condition").count() == 1
        v.check_accessibility()
        if role == "builder":
            v.shot("workflow-graph")
        v.close()
    with httpx.Client(base_url=world.url) as c:  # no session: to the sign-in form, nothing changed
        r = c.post("/console/budgets", data={"scope": "team", "scope_id": "sales", "amount": "1"})
        assert r.status_code == 401


def test_a_refused_deployment_change_keeps_the_stored_key(world):
    """Regression: the console's change form stored a new API key before the change was validated, so a change
    refused as invalid still replaced the live deployment's vault secret."""
    with world.admin() as admin:
        r = admin.post("/admin/deployments", json={"alias": "steady", "provider": "openai_compatible",
                                                   "model": "gpt-steady", "base_url": world.extra["keyed"].url,
                                                   "api_key": UPSTREAM_KEY})
        assert r.status_code == 201, r.text
        c, csrf = _session(world, world.admin_key)
        r = c.post("/console/deployments/edit", data={"csrf": csrf, "id": r.json()["id"], "weight": "-1",
                                                      "api_key": "sk-wrong"})
        c.close()
        assert r.status_code == 422 and "weight" in r.text
        chat = admin.post("/v1/chat/completions", json={"model": "steady", "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text  # the upstream still gets the key it accepts
        assert admin.delete("/admin/deployments/steady/openai_compatible/gpt-steady").status_code == 204
