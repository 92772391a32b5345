"""Traces to a real collector: `keel serve` exports OTLP (HTTP/protobuf and gRPC) to a loopback receiver that
decodes `opentelemetry-proto`'s `ExportTraceServiceRequest`; each request is one trace with Keel's span tree,
the caller's traceparent continued, GenAI attributes, and prompt/completion content only where the policy
allows it — redacted as the guards say."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from conftest import eventually, wait_ledger
from tests.fakes.openai_upstream import FakeOpenAI
from tests.observe.otlp_receiver import GrpcReceiver, HttpReceiver

pytestmark = pytest.mark.store

REPLY = "Sure, write to ops@example.com about it."
POLICY = """
name: traced
guards:
  input: {pii: redact}
  output: {pii: redact}
traces: {content: true, max_classification: internal}
"""


def config(tmp_path, upstream: str, more_models: str = "") -> Any:
    path = tmp_path / "keel.yaml"
    path.write_text(f"""
models:
  - {{alias: cloud, provider: openai_compatible, model: gpt-cloud, id: cloud/remote, base_url: {upstream},
      input_price_per_1m: 1.0, output_price_per_1m: 2.0}}
{more_models}
ledger_flush_interval_s: 0.05
""")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    return path, policy


@pytest.fixture
def upstream():
    fake = FakeOpenAI(reply=REPLY).start()
    yield fake
    fake.stop()


def traced_server(server_factory, tmp_path, upstream, receiver, **env: str):
    cfg, policy = config(tmp_path, upstream.url)
    return server_factory(config=cfg, KEEL_POLICY_FILE=str(policy), KEEL_TRACE_EXPORTER="otlp",
                          OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="50", **env)


def chat(srv, content: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    with srv.admin() as c:
        return c.post("/v1/chat/completions", headers=headers or {},
                      json={"model": "cloud", "messages": [{"role": "user", "content": content}], **body})


def tree(spans: list[dict[str, Any]]) -> dict[str, list[str]]:
    """span name → the names of its children."""
    by_id = {s["span_id"]: s for s in spans}
    out: dict[str, list[str]] = {s["name"]: [] for s in spans}
    for s in spans:
        if s["parent_id"] in by_id:
            out[by_id[s["parent_id"]]["name"]].append(s["name"])
    return out


def spans_of(receiver, trace_id: str, n: int) -> list[dict[str, Any]]:
    """The trace's spans once its server span arrived (it ends last) and there are at least `n`."""
    def done() -> list[dict[str, Any]] | None:
        spans = receiver.trace(trace_id)
        return spans if len(spans) >= n and any(s["parent_id"] in (None, CALLER_SPAN) or s["kind"] == 2
                                                for s in spans) else None
    return eventually(done, timeout=20)


CALLER_SPAN = "00f067aa0ba902b7"


def test_one_trace_per_request_with_the_span_tree_genai_attributes_and_redacted_content(
        server_factory, tmp_path, upstream, db_url):
    """Guards the whole tracing claim over OTLP/HTTP: caller's trace continued, tree, GenAI, content policy."""
    receiver = HttpReceiver().start()
    try:
        srv = traced_server(server_factory, tmp_path, upstream, receiver,
                            OTEL_SERVICE_NAME="keel-under-test",
                            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,team=platform",
                            OTEL_EXPORTER_OTLP_HEADERS="x-tenant=acme")
        trace_id = secrets.token_hex(16)
        r = chat(srv, "Please mail bob@example.com the report",
                 headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
        assert r.status_code == 200, r.text
        rid = r.headers["x-request-id"]
        spans = spans_of(receiver, trace_id, 10)

        server = [s for s in spans if s["kind"] == 2]  # SPAN_KIND_SERVER
        assert len(server) == 1 and server[0]["parent_id"] == CALLER_SPAN  # the caller's trace, continued
        assert server[0]["attributes"]["keel.request_id"] == rid
        assert server[0]["attributes"]["http.response.status_code"] == 200
        t = tree(spans)
        assert set(t[server[0]["name"]]) == {"auth", "chat cloud"}
        assert t["chat cloud"] == ["rate_limiter"]
        assert t["rate_limiter"] == ["policy"] and t["policy"] == ["guard"]
        assert "guard pii" in t["guard"] and "budgets" in t["guard"]
        assert t["budgets"] == ["cache"] and t["cache"] == ["router"] and t["router"] == ["chat gpt-cloud"]

        row = wait_ledger(db_url, f"request_id = '{rid}'")[0]
        provider = next(s for s in spans if s["name"] == "chat gpt-cloud")
        assert provider["kind"] == 3  # SPAN_KIND_CLIENT
        a = provider["attributes"]
        assert a["gen_ai.system"] == "openai_compatible" and a["gen_ai.request.model"] == "gpt-cloud"
        assert a["gen_ai.response.model"] == "gpt-cloud" and a["gen_ai.response.finish_reasons"] == ["stop"]
        assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (row.tokens_in, row.tokens_out)
        assert a["keel.deployment"] == "cloud/remote"
        call = next(s for s in spans if s["name"] == "chat cloud")["attributes"]
        assert call["gen_ai.request.model"] == "cloud" and call["keel.request_id"] == rid
        assert call["gen_ai.usage.output_tokens"] == row.tokens_out
        policy = next(s for s in spans if s["name"] == "policy")["attributes"]
        assert policy["keel.classification"] == "internal"

        # The policy allows content at `internal`: recorded, as the guards left it.
        prompt, completion = call["gen_ai.input.messages"], call["gen_ai.output.messages"]
        assert "mail" in prompt and "bob@example.com" not in prompt
        assert "write to" in completion and "ops@example.com" not in completion
        assert "bob@example.com" not in str(spans) and "ops@example.com" not in str(spans)

        resource = server[0]["resource"]
        assert resource["service.name"] == "keel-under-test"
        assert resource["deployment.environment"] == "test" and resource["team"] == "platform"
        assert any(h.get("x-tenant") == "acme" for h in receiver.headers)

        # Above `max_classification`, no content at all; and each request is a trace of its own.
        r2 = chat(srv, "secret plans", metadata={"classification": "confidential"})
        assert r2.status_code == 200, r2.text
        rid2 = r2.headers["x-request-id"]

        def second() -> list[dict[str, Any]] | None:
            with receiver.lock:
                found = [s for s in receiver.spans if s["attributes"].get("keel.request_id") == rid2]
            return found if len(found) == 2 else None  # its server span and its call span
        found = eventually(second, timeout=20)
        assert found[0]["trace_id"] == found[1]["trace_id"] != trace_id
        other = receiver.trace(found[0]["trace_id"])
        assert len([s for s in other if s["kind"] == 2]) == 1 and all(s["parent_id"] for s in other
                                                                      if s["kind"] != 2)
        assert not any(k.startswith("gen_ai.input") or k.startswith("gen_ai.output")
                       for s in other for k in s["attributes"])
        assert "secret plans" not in str(other)

        # A stream: its prompt is recorded (redacted), its answer is not.
        trace_id = secrets.token_hex(16)
        r3 = chat(srv, "stream to carol@example.com", headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"},
                  stream=True)
        assert r3.status_code == 200 and "data:" in r3.text
        streamed = next(s for s in spans_of(receiver, trace_id, 10) if s["name"] == "chat cloud")["attributes"]
        assert "stream to" in streamed["gen_ai.input.messages"] and "carol@" not in str(streamed)
        assert "gen_ai.output.messages" not in streamed
    finally:
        receiver.stop()


def test_default_policy_records_no_content_and_detail_and_sampler_are_honoured(server_factory, tmp_path, upstream):
    """The built-in policy records no prompt or completion text. `trace_detail: calls` keeps the request,
    the call and the provider attempt; OTEL_TRACES_SAMPLER (ratio 0, parent-based) drops Keel's own traces
    but follows a caller that sampled."""
    receiver = HttpReceiver().start()
    try:
        cfg, _ = config(tmp_path, upstream.url)
        srv = server_factory(config=cfg, KEEL_TRACE_EXPORTER="otlp", KEEL_TRACE_DETAIL="calls",
                             OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="50",
                             OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
        assert chat(srv, "not sampled").status_code == 200
        trace_id = secrets.token_hex(16)
        r = chat(srv, "the launch code is tangerine", headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
        assert r.status_code == 200, r.text
        spans = spans_of(receiver, trace_id, 3)
        assert sorted(s["name"] for s in spans) == ["POST /v1/chat/completions", "chat cloud", "chat gpt-cloud"]
        assert "tangerine" not in str(spans) and "ops@example.com" not in str(spans)
        with receiver.lock:
            assert {s["trace_id"] for s in receiver.spans} == {trace_id}  # the unsampled request made none
    finally:
        receiver.stop()


def test_a_sampled_out_request_makes_no_span_and_a_sampled_caller_gets_every_stage(server_factory, tmp_path,
                                                                                   upstream):
    """With every stage traced and Keel's own traces sampled out (ratio 0), a request makes no span at all —
    nor does one whose caller said "not sampled" — while a caller that sampled gets the whole tree: the
    stage spans, the guard scans and the provider attempt under the call span."""
    receiver = HttpReceiver().start()
    try:
        srv = traced_server(server_factory, tmp_path, upstream, receiver,
                            OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
        assert chat(srv, "not sampled").status_code == 200
        unsampled = secrets.token_hex(16)
        assert chat(srv, "caller says no", headers={"traceparent": f"00-{unsampled}-{CALLER_SPAN}-00"}).status_code == 200
        trace_id = secrets.token_hex(16)
        assert chat(srv, "caller says yes", headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"}).status_code == 200
        names = {s["name"] for s in spans_of(receiver, trace_id, 8)}
        assert {"POST /v1/chat/completions", "auth", "chat cloud", "policy", "router", "chat gpt-cloud"} <= names
        assert any(n.startswith("guard ") for n in names)
        with receiver.lock:
            assert {s["trace_id"] for s in receiver.spans} == {trace_id}
    finally:
        receiver.stop()


def test_otlp_over_grpc(server_factory, tmp_path, upstream):
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc sends the same trace to a gRPC collector."""
    receiver = GrpcReceiver().start()
    try:
        srv = traced_server(server_factory, tmp_path, upstream, receiver, OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
                            OTEL_EXPORTER_OTLP_TRACES_HEADERS="x-tenant=grpc-acme")
        trace_id = secrets.token_hex(16)
        r = chat(srv, "hello", headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"}, stream=True)
        assert r.status_code == 200, r.text
        spans = spans_of(receiver, trace_id, 8)
        call = next(s for s in spans if s["name"] == "chat cloud")["attributes"]
        assert call["gen_ai.response.finish_reasons"] == ["stop"] and call["gen_ai.usage.output_tokens"] > 0
        assert any(h.get("x-tenant") == "grpc-acme" for h in receiver.headers)
    finally:
        receiver.stop()


def test_a_dead_collector_neither_blocks_nor_fails_requests_and_drops_are_counted(server_factory, tmp_path,
                                                                                   upstream):
    """Export runs off the request path: with the collector down and a 3-span queue, requests still answer,
    and every span that did not fit is counted on /metrics."""
    from conftest import free_port
    from prometheus_client.parser import text_string_to_metric_families

    cfg, policy = config(tmp_path, upstream.url)
    srv = server_factory(config=cfg, KEEL_POLICY_FILE=str(policy), KEEL_TRACE_EXPORTER="otlp",
                         KEEL_TRACE_QUEUE_SIZE="3", OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                         OTEL_EXPORTER_OTLP_TIMEOUT="1")
    for _ in range(5):
        assert chat(srv, "hello").status_code == 200

    def counted() -> dict[str, float] | None:
        with srv.admin() as c:
            text = c.get("/metrics").text
        values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name.startswith("keel_trace_spans")}
        return values if values.get("keel_trace_spans_dropped_total", 0) > 0 else None
    values = counted() or eventually(counted, timeout=20)
    assert values["keel_trace_spans_exported_total"] == 0


def test_a_workflow_run_is_one_trace_with_a_span_per_step(server_factory, tmp_path, upstream):
    """A run (no HTTP request around it) starts its own trace; each step is a span, and the llm step's model
    call hangs under its step with the gateway's spans."""
    from tests.workflows.conftest import define, start, wait_run

    receiver = HttpReceiver().start()
    try:
        srv = traced_server(server_factory, tmp_path, upstream, receiver)
        define(srv, "name: traced_flow\nsteps:\n  - id: ask\n    type: llm\n    model: cloud\n    max_tokens: 8\n"
                    "    prompt: \"Say hi\"\n  - id: shape\n    type: transform\n    output: done\n")
        run_id = start(srv, "traced_flow")
        assert wait_run(srv, "traced_flow", run_id)["status"] == "completed"

        def run_trace() -> list[dict[str, Any]] | None:
            with receiver.lock:
                root = [s for s in receiver.spans if s["name"] == "workflow run"
                        and s["attributes"].get("keel.run_id") == run_id]
            return receiver.trace(root[0]["trace_id"]) if root else None
        spans = eventually(run_trace, timeout=20)
        t = tree(spans)
        assert sorted(t["workflow run"]) == ["workflow step ask", "workflow step shape"]
        assert "chat cloud" in t["workflow step ask"]
        step = next(s for s in spans if s["name"] == "workflow step shape")["attributes"]
        assert step["keel.workflow"] == "traced_flow" and step["keel.step_type"] == "transform"
        assert any(s["name"] == "chat gpt-cloud" for s in spans)
    finally:
        receiver.stop()


def test_retrieval_is_a_span_of_the_search_request(server_factory, tmp_path, upstream):
    """/v1/search is traced too: a `retrieval` span with the mode and the number of hits, its query
    embedding a model call under it."""
    receiver = HttpReceiver().start()
    try:
        cfg, _ = config(tmp_path, upstream.url, "  - {alias: emb, provider: openai_compatible, model: emb-fake, "
                                                f"kind: embedding, base_url: {upstream.url}}}")
        srv = server_factory(config=cfg, KEEL_TRACE_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                             OTEL_BSP_SCHEDULE_DELAY="50")
        with srv.admin() as a:
            r = a.post("/v1/collections", json={"name": "docs", "classification": "internal",
                                                "embedding_model": "emb"})
            assert r.status_code == 201, r.text
            parts = [("files", ("a.md", b"# On-call\n\nTeam 47 rotates on-call duty weekly.", "text/markdown"))]
            r = a.post("/v1/collections/docs/documents", params={"wait": 60}, files=parts,
                       data={"sources": '["a.md"]'}, timeout=90)
            assert r.status_code in (200, 201, 202), r.text
            trace_id = secrets.token_hex(16)
            r = a.post("/v1/search", json={"query": "who rotates on-call?", "collections": ["docs"]},
                       headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
            assert r.status_code == 200, r.text
        spans = spans_of(receiver, trace_id, 3)
        retrieval = next(s for s in spans if s["name"] == "retrieval")
        assert retrieval["attributes"]["keel.retrieval.hits"] == len(r.json()["data"]) >= 1
        assert "embeddings emb" in tree(spans)["retrieval"]
    finally:
        receiver.stop()


def test_an_agent_run_is_one_trace_with_a_span_per_action(server_factory, tmp_path):
    """An agent run starts its own trace: a span per model call (the gateway's spans under it) and per tool call."""
    from tests.agents.conftest import ScriptedModel, call, define, run, say

    model = ScriptedModel({"note": [call("notify", {"to": "ops@acme.example", "subject": "s", "body": "b"}),
                                    say("Sent.")]}).start()
    receiver = HttpReceiver().start()
    try:
        cfg = tmp_path / "keel.yaml"
        cfg.write_text(f"models:\n  - {{alias: agent-model, provider: openai_compatible, model: m, "
                       f"base_url: {model.url}}}\n")
        srv = server_factory(config=cfg, KEEL_TRACE_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                             OTEL_BSP_SCHEDULE_DELAY="50")
        define(srv, "name: notifier\nmodel: agent-model\ngoal: g\ntools:\n"
                    "  notify: {allow_recipients: [\"*@acme.example\"]}\n")
        out = run(srv, "notifier", "[script:note] tell ops")
        assert out["status"] == "completed", out

        def run_trace() -> list[dict[str, Any]] | None:
            with receiver.lock:
                root = [s for s in receiver.spans if s["name"] == "agent run"
                        and s["attributes"].get("keel.agent_run_id") == out["id"]]
            spans = receiver.trace(root[0]["trace_id"]) if root else []
            return spans if sum(s["name"] == "agent model" for s in spans) == 2 else None
        spans = eventually(run_trace, timeout=20)
        t = tree(spans)
        assert sorted(t["agent run"]) == ["agent model", "agent model", "agent tool notify"]
        assert all(s["attributes"]["keel.agent"] == "notifier" for s in spans
                   if s["name"] in ("agent model", "agent tool notify"))
        assert any(s["name"] == "chat m" for s in spans)
    finally:
        receiver.stop()
        model.stop()
