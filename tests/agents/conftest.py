"""Agent test harness: a scripted OpenAI-compatible upstream that plays the model (benign or an attacker
obeying an injection), loopback receivers for the outside world, and helpers to define and run agents."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from conftest import KeelServer
from tests.fakes.openai_upstream import FakeOpenAI


def call(name: str, args: Any) -> dict[str, Any]:
    """A scripted turn: one tool call (`args` a dict, or a raw string sent as it is)."""
    return {"call": name, "args": args}


def say(text: str) -> dict[str, Any]:
    """A scripted turn: the final answer."""
    return {"say": text}


class ScriptedModel(FakeOpenAI):
    """Plays `scripts[name]` for a conversation whose task (its last user message: an end user's thread puts
    earlier runs' turns before it) contains `[script:name]`: turn i (the number of assistant messages after the
    task) is the script's i-th entry; a script with `loop=True` repeats its last turn forever (a model stuck in a
    loop). Stateless per request, so a replayed or resumed run gets the same turns."""

    def __init__(self, scripts: dict[str, list[dict[str, Any]]], loops: set[str] = frozenset(), **kw: Any) -> None:
        super().__init__(**kw)
        self.scripts, self.loops = scripts, set(loops)

    def answer(self, body: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None, str]:
        messages = body["messages"]
        at = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
        task = messages[at].get("content") or "" if messages else ""
        name = task.split("[script:", 1)[1].split("]", 1)[0] if "[script:" in task else ""
        script = self.scripts.get(name) or [say("no script")]
        turn = sum(1 for m in messages[at:] if m.get("role") == "assistant")
        if turn >= len(script):
            turn = len(script) - 1 if name in self.loops else -1
        step = script[turn] if turn >= 0 else say("done")
        if "say" in step:
            return [step["say"]], None, "stop"
        args = step["args"] if isinstance(step["args"], str) else orjson.dumps(step["args"]).decode()
        return [], {"id": f"call_{turn}", "type": "function",
                    "function": {"name": step["call"], "arguments": args}}, "tool_calls"


def define(srv: KeelServer, source: str, key: str | None = None, status: tuple[int, ...] = (200, 201)) -> httpx.Response:
    with srv.client(key or srv.admin_key) as c:
        r = c.post("/v1/agents", content=source, headers={"content-type": "application/yaml"})
    assert r.status_code in status, r.text
    return r


def run(srv: KeelServer, agent: str, task: str, key: str | None = None, wait_s: float = 60) -> dict[str, Any]:
    with srv.client(key or srv.admin_key, timeout=wait_s + 30) as c:
        r = c.post(f"/v1/agents/{agent}/runs", json={"task": task, "wait_s": wait_s})
    assert r.status_code in (200, 202), r.text
    return r.json()


def detail(srv: KeelServer, agent: str, run_id: str, key: str | None = None) -> dict[str, Any]:
    with srv.client(key or srv.admin_key) as c:
        r = c.get(f"/v1/agents/{agent}/runs/{run_id}")
    assert r.status_code == 200, r.text
    return r.json()
