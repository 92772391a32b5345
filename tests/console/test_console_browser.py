"""The console in a real browser (Debian's chromium via Playwright), the real server on loopback, no mocked
API: for each role, sign in, visit every page its navigation offers (each checked with axe-core), do its
main task and check what is on screen — at 1280 px and 390 px wide. Any console error or failed request
fails the test (`Visit.close`)."""

from __future__ import annotations

import httpx
import pytest

from tests.console.browser import WIDTHS, Visit
from tests.fakes.openai_upstream import FakeOpenAI
from conftest import eventually, wait_ledger

# Not marked `store`: the pages' store-side rules run on PostgreSQL too in tests/test_authz_matrix.py and
# tests/console/test_sessions.py; a second browser pass would only add minutes to CI.
pytestmark = pytest.mark.timeout(240)

LEAD_INTAKE = """
name: lead_intake
description: Draft a reply to a new lead; a reviewer checks it before it is sent.
inputs: {type: object, required: [company], properties: {company: {type: string}, seats: {type: integer}}}
steps:
  - id: draft
    type: transform
    output: "Hello {{ inputs.company }}, thanks for your interest."
  - id: review
    type: approval
    approvers: [reviewer, admin]
    instructions: Check the reply to {{ inputs.company }} before it goes out.
    show:
      company: "{{ inputs.company }}"
      draft: "{{ steps.draft.output.value }}"
    editable: [draft]
  - id: send
    type: notify
    email: "leads@example.com"
    subject: "Re: your enquiry"
    body: "{{ steps.review.output.fields.draft }}"
"""
PASSWORD = "reviewer's long passphrase"
HANDBOOK = """# Refunds

Customers may ask for a refund within 30 days of purchase. Refunds go back to the original card.

# Shipping

Orders ship within two working days from the Rotterdam warehouse.
"""


class World:
    """Teams sales and ops, a key per role (sales) plus an ops member, a reviewer user with a password, the
    lead_intake workflow with one waiting run per team, and a few metered calls for the charts."""

    def __init__(self, srv) -> None:
        self.srv = srv
        self.keys: dict[str, str] = {}
        with srv.admin() as admin:
            for team in ("sales", "ops"):
                assert admin.post("/admin/teams", json={"name": team}).status_code == 201
            for role, team in (("builder", "sales"), ("member", "sales"), ("auditor", None), ("member", "ops")):
                r = admin.post("/admin/keys", json={"role": role, "team": team, "name": f"{role}-{team}"})
                self.keys[f"{role}-{team}"] = r.json()["key"]
            assert admin.post("/admin/users", json={"email": "rev@example.com", "role": "reviewer",
                                                    "team": "sales"}).status_code == 201
            assert admin.put("/admin/users/rev@example.com/password", json={"password": PASSWORD}).status_code == 200
            r = admin.post("/v1/workflows", content=LEAD_INTAKE, headers={"content-type": "application/yaml"})
            assert r.status_code in (200, 201), r.text
        self.sales_run = self.start(self.keys["member-sales"], "Acme")
        self.ops_run = self.start(self.keys["member-ops"], "Globex")
        for key in (self.keys["member-sales"], self.keys["builder-sales"], srv.admin_key):
            with srv.client(key) as c:
                r = c.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200, r.text
        with srv.client(self.keys["builder-sales"]) as c:
            r = c.post("/v1/collections", json={"name": "handbook", "classification": "internal",
                                                "embedding_model": "fake-embed"})
            assert r.status_code == 201, r.text
            r = c.post("/v1/collections/handbook/documents?wait=60",
                       files={"files": ("refunds.md", HANDBOOK.encode(), "text/markdown")})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
            r = c.post("/v1/agents", content="name: helper\nmodel: fake\ngoal: Answer questions about orders.\n"
                                              "tools: {}\n", headers={"content-type": "application/yaml"})
            assert r.status_code == 201, r.text
        with srv.client(self.keys["member-sales"]) as c:
            r = c.post("/v1/agents/helper/runs", json={"task": "Where is order 42?", "wait_s": 30})
            assert r.status_code == 200 and r.json()["status"] == "completed", r.text
            self.agent_run = r.json()["id"]
        wait_ledger(srv.extra["db_url"], n=3)
        for run in (self.sales_run, self.ops_run):
            self.wait_status(run, "waiting_approval")

    def start(self, key: str, company: str) -> str:
        with self.srv.client(key) as c:
            r = c.post("/v1/workflows/lead_intake/runs", json={"inputs": {"company": company}})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def wait_status(self, run_id: str, status: str) -> dict:
        def reached() -> dict | None:
            with self.srv.admin() as c:
                d = c.get(f"/v1/workflows/lead_intake/runs/{run_id}").json()
            return d if d["status"] == status else None
        return eventually(reached, timeout=60, interval=0.1, retry=(httpx.HTTPError,))


@pytest.fixture(scope="module")
def world(module_server_factory, tmp_path_factory):
    upstream = FakeOpenAI().start()
    base = tmp_path_factory.mktemp("console")
    (base / "keel.yaml").write_text(f"""
models:
  - {{alias: fake, provider: openai_compatible, model: gpt-fake, base_url: {upstream.url},
      input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
  - {{alias: fake-embed, provider: openai_compatible, model: embed-fake, kind: embedding, base_url: {upstream.url}}}
ledger_flush_interval_s: 0.1
""")
    srv = module_server_factory(config=base / "keel.yaml")
    try:
        yield World(srv)
    finally:
        srv.stop()
        upstream.stop()


@pytest.fixture(params=list(WIDTHS), ids=list(WIDTHS))
def width(request) -> int:
    return WIDTHS[request.param]


def test_admin_creates_and_revokes_a_key(world, browser, width):
    v = Visit(browser, world.srv.url, width)
    v.sign_in_with_key(world.srv.admin_key)
    assert v.visit_all(shots=width == WIDTHS["desktop"]) == [
        "Overview", "Usage & cost", "Playground", "Knowledge", "Inbox", "Workflows", "Agents", "Audit", "Admin: keys",
        "Admin: people", "Admin: budgets", "Admin: limits", "Admin: deployments", "Policy", "Guard events"]
    v.open("/console/keys")
    name = f"ci-bot-{width}"
    v.page.get_by_label("Name").fill(name)
    v.page.get_by_label("Role").select_option("builder")
    v.page.get_by_label("Team").select_option(label="sales")
    v.page.get_by_role("button", name="Create key").click()
    shown = v.page.locator("#created-key").inner_text()
    assert shown.startswith("sk-keel-") and "not shown again" in v.page.content()
    v.check_accessibility()
    with world.srv.client(shown) as c:
        assert c.get("/v1/me").json()["role"] == "builder"
    v.open("/console/keys")
    assert shown not in v.page.content()  # shown once
    v.page.get_by_role("button", name=f"Revoke key {name}").click()
    v.page.wait_for_url("**/console/keys")
    assert v.page.get_by_role("row").filter(has_text=name).get_by_text("revoked").count() == 1
    with world.srv.client(shown) as c:
        assert eventually(lambda: c.get("/v1/me").status_code == 401, timeout=10)
    v.open("/console/people")  # a new user, then its password; the user signs in with it
    email = f"newbie{width}@example.com"
    v.page.get_by_label("Email").fill(email)
    v.page.get_by_label("Role").select_option("member")
    v.page.get_by_label("Team", exact=True).select_option(label="sales")
    v.page.get_by_role("button", name="Create user").click()
    assert f"User {email} created." in v.page.get_by_role("status").inner_text()
    v.page.get_by_label(f"New password for {email}").fill("newbie's long passphrase")
    v.page.get_by_role("button", name=f"Set password for {email}").click()
    assert "their open sessions ended" in v.page.get_by_role("status").inner_text()
    v.check_accessibility()
    v.close()
    newbie = Visit(browser, world.srv.url, width)
    newbie.sign_in_with_password(email, "newbie's long passphrase")
    assert email in newbie.page.get_by_role("banner").inner_text()
    newbie.close()


def test_auditor_verifies_the_chain(world, browser, width):
    v = Visit(browser, world.srv.url, width)
    v.sign_in_with_key(world.keys["auditor-None"])
    assert v.visit_all() == ["Overview", "Usage & cost", "Inbox", "Workflows", "Agents", "Audit", "Policy",
                             "Guard events"]
    v.open("/console/audit")
    assert v.page.get_by_role("cell", name="console.sign_in").count() >= 1
    v.page.get_by_role("button", name="Verify the chain").click()
    verdict = v.page.get_by_role("status")
    assert "Chain intact" in verdict.inner_text()
    if width == WIDTHS["desktop"]:
        v.shot("audit-verified")
    assert v.page.url.endswith("/console/audit")  # htmx swapped the verdict in place
    v.check_accessibility()
    v.open("/console/usage?group_by=model")
    assert v.page.get_by_role("cell", name="fake", exact=True).count() == 1
    with v.page.expect_download() as download:
        v.page.get_by_role("link", name="Download CSV").click()
    assert download.value.suggested_filename == "keel-usage.csv"
    v.close()


def test_reviewer_edits_and_approves_the_lead_intake_draft(world, browser):
    """Signed in with email and password; the inbox is keyboard-operable: the edit and the approval are
    made with the keyboard alone."""
    v = Visit(browser, world.srv.url, WIDTHS["desktop"])
    v.sign_in_with_password("rev@example.com", PASSWORD)
    assert v.visit_all() == ["Overview", "Usage & cost", "Playground", "Knowledge", "Inbox", "Workflows", "Agents"]
    v.open("/console/inbox")
    item = v.page.get_by_role("article").filter(has_text=world.sales_run)
    assert item.count() == 1 and v.page.get_by_role("article").filter(has_text=world.ops_run).count() == 0
    v.shot("inbox")
    draft = item.get_by_label("draft (editable)")
    assert draft.input_value() == "Hello Acme, thanks for your interest."
    draft.focus()
    v.page.keyboard.press("Control+A")
    v.page.keyboard.type("Hello Acme, a colleague will call you today.")
    v.page.keyboard.press("Tab")  # to the reason box
    v.page.keyboard.type("friendlier")
    v.page.keyboard.press("Tab")  # to Approve
    v.page.keyboard.press("Enter")
    v.page.wait_for_url("**/console/inbox?done=*")
    assert "approved: lead_intake" in v.page.get_by_role("status").inner_text()
    done = world.wait_status(world.sales_run, "completed")
    review = next(s for s in done["steps"] if s["id"] == "review")
    assert review["output"]["fields"]["draft"] == "Hello Acme, a colleague will call you today."
    v.check_accessibility()
    v.close()
    run = world.start(world.keys["member-sales"], "Hooli")  # the requester cancels a run, then retries it
    world.wait_status(run, "waiting_approval")
    member = Visit(browser, world.srv.url, WIDTHS["desktop"])
    member.sign_in_with_key(world.keys["member-sales"])
    member.open(f"/console/workflows/lead_intake/runs/{run}")
    member.page.get_by_role("button", name="Cancel run").click()
    member.page.get_by_label("Retry from step").select_option("review")
    member.page.get_by_role("button", name="Retry").click()
    member.page.wait_for_url(lambda url: "/runs/run_" in url and run not in url)
    again = world.wait_status(member.page.url.rsplit("/", 1)[1], "waiting_approval")
    assert [s["status"] for s in again["steps"]] == ["carried_over", "waiting_approval", "pending"]
    member.close()


def test_member_sees_its_team_only_and_gets_not_found_for_another_teams_run(world, browser, width):
    v = Visit(browser, world.srv.url, width)
    v.sign_in_with_key(world.keys["member-sales"])
    assert v.visit_all() == ["Overview", "Usage & cost", "Playground", "Knowledge", "Workflows", "Agents"]
    v.open("/console/overview")
    assert v.page.get_by_role("img", name="requests per day").count() == 1
    with world.srv.client(world.keys["member-sales"]) as c:  # its own calls only, as the API reports them
        mine = c.get("/v1/usage").json()["totals"]["requests"]
    assert mine >= 1 and v.page.locator(".figures dd").first.inner_text() == str(mine)
    v.open("/console/workflows")
    assert v.page.get_by_role("link", name=world.sales_run).count() == 1
    assert v.page.get_by_role("link", name=world.ops_run).count() == 0
    path = f"/console/workflows/lead_intake/runs/{world.ops_run}"
    v.expect(path, 404)
    assert v.open(path).status == 404
    assert v.page.get_by_role("heading", level=1).inner_text() == "Not found"
    v.check_accessibility()
    v.open("/console/playground")
    v.page.get_by_label("Model").select_option("fake")
    v.page.get_by_label("handbook").check()
    v.page.get_by_label("Message").fill("How long do customers have to ask for a refund?")
    v.streams("/console/playground/chat")
    v.page.get_by_role("button", name="Send").click()
    v.page.locator("#transcript[data-state=idle]").wait_for()  # the streamed turn is over
    cites = v.page.get_by_role("list", name="Citations")
    cites.get_by_text("[1] ").first.click()  # opens the cited passage
    assert cites.locator("blockquote").first.is_visible()
    # the fake embedder's vectors are arbitrary, so which passage ranks is too: each shown is the handbook's own
    assert all(t.strip() in HANDBOOK for t in cites.locator("blockquote").all_text_contents())
    assert "(handbook)" in cites.locator("summary").first.inner_text()
    assert "request req_" in v.page.locator(".turn-meta").last.inner_text()  # the stream's last line arrived
    assert not v.page.locator(".turn .error").count()
    assert v.page.locator(".reply").last.inner_text().strip()
    if width == WIDTHS["desktop"]:
        v.shot("playground")
    v.check_accessibility()
    for forbidden in ("/console/keys", "/console/audit"):
        v.expect(forbidden, 403)
        assert v.open(forbidden).status == 403
        assert v.page.get_by_role("heading", level=1).inner_text() == "Not allowed"
    v.close()


def test_builder_starts_a_run_from_the_generated_form(world, browser):
    v = Visit(browser, world.srv.url, WIDTHS["phone"])
    v.sign_in_with_key(world.keys["builder-sales"])
    assert v.visit_all() == ["Overview", "Usage & cost", "Playground", "Knowledge", "Workflows", "Agents"]
    v.open("/console/knowledge/handbook")
    v.page.get_by_label("Files").set_input_files(files=[
        {"name": "returns.md", "mimeType": "text/markdown", "buffer": b"# Returns\n\nReturned goods are checked in 5 days."},
        {"name": "holidays.txt", "mimeType": "text/plain", "buffer": b"The office closes on 24 December."}])
    v.page.get_by_role("button", name="Upload").click()
    uploads = v.page.locator("#uploads li")
    for i in range(2):
        assert "indexed:" in uploads.nth(i).locator(".ok").inner_text(timeout=30_000)
    v.page.reload()
    assert v.page.get_by_role("cell", name="returns.md").count() == 1
    v.page.get_by_label("Query").fill("when does the office close")
    v.page.get_by_role("button", name="Search").click()
    assert "24 December" in v.page.locator(".hits").inner_text()
    v.shot("collection")
    v.check_accessibility()
    jobs = v.page.get_by_role("table").filter(has_text="Latest uploads")
    assert jobs.get_by_role("cell", name="succeeded").count() >= 1
    v.page.get_by_role("link", name="returns.md").click()
    assert "Returned goods are checked in 5 days." in v.page.locator(".chunks").inner_text()
    v.shot("document")
    v.check_accessibility()
    v.open("/console/agents/helper")
    assert "Answer questions about orders." in v.page.get_by_role("region", name="Mandate").inner_text()
    v.shot("agent")
    v.page.get_by_role("link", name=world.agent_run).click()
    log = v.page.get_by_role("table").filter(has_text="Every action")
    assert log.get_by_role("cell", name="model", exact=True).count() >= 1
    assert log.get_by_role("cell", name="allowed", exact=True).count() >= 1
    v.check_accessibility()
    v.open("/console/agents/helper")
    v.page.get_by_label("Reason").fill("checking a complaint")
    v.page.get_by_role("button", name="Pause agent").click()
    v.page.get_by_role("button", name="Resume agent").wait_for()
    with world.srv.client(world.keys["member-sales"]) as c:
        assert c.get("/v1/agents/helper").json()["paused"] is True
    v.page.get_by_role("button", name="Resume agent").click()
    v.page.get_by_role("button", name="Pause agent").wait_for()
    v.open("/console/workflows/lead_intake")
    v.page.get_by_label("company (required)").fill("Initech")
    v.page.get_by_label("seats").fill("12")
    v.page.get_by_role("button", name="Start run").click()
    v.page.wait_for_url("**/console/workflows/lead_intake/runs/run_*")
    run_id = v.page.url.rsplit("/", 1)[1]
    assert world.wait_status(run_id, "waiting_approval")["inputs"] == {"company": "Initech", "seats": 12}
    v.page.reload()
    v.shot("run")
    timeline = v.page.get_by_role("region", name="Steps")
    assert "waiting approval" in timeline.inner_text() and "completed" in timeline.inner_text()
    v.check_accessibility()
    v.close()
