"""The OpenAI Responses API: `POST /v1/responses` (streaming or not), `GET` and `DELETE
/v1/responses/{id}`. A request is translated once into a chat call (`responses_shape`), runs the one
governed path (`Gateway.chat` / `chat_stream`: policy, guards, budgets, cache, ledger, audit), and its
answer is translated back; with `store` (the default) it is kept for `previous_response_id`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request, Response

from keel.core.db import Store
from keel.core.errors import KeelError
from keel.core.http import HotEndpoint, JSONAnswer, StreamedResponse, hot_json_endpoint, json_response
from keel.core.ids import new_id
from keel.core.logs import request_id_var
from keel.gateway.ingress.response_store import ResponseStore
from keel.gateway.ingress.responses_shape import (
    Request as ResponsesRequest, ResponsesBody, chat_data, check_supported, fast_responses_body, function_item,
    finished, input_items, message_item, output_items, parsed, response_json, to_messages,
)
from keel.gateway.pipeline import Call, Gateway
from keel.gateway.protocol import ChatDelta, ChatResult, Usage
from keel.gateway.routes import answer_chat, answer_headers, chat_request, first_delta
from keel.identity.auth import principal
from keel.identity.principal import Principal

router = APIRouter()


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


def _response_id(request_id: str) -> str:
    """The response's id, from the request's (`req_x` → `resp_x`), so the ledger row is found by it."""
    return "resp_" + request_id.removeprefix("req_") if request_id else new_id("resp")


@router.post("/v1/responses", tags=["gateway"])
async def create_response(body: ResponsesBody, request: Request, p: Principal = Depends(principal)) -> Response:
    """OpenAI Responses API: input items, instructions, function tools, `text.format`, `previous_response_id`,
    streaming with the Responses event types; through the governed path like chat completions."""
    return await _create(body, request, p)


async def _create(body: ResponsesBody | ResponsesRequest, request: Request, p: Principal) -> Response:
    req = parsed(body)
    check_supported(req)
    store = _store(request)
    inp, previous, instructions = req["input"], req.get("previous_response_id"), req.get("instructions")
    if type(inp) is str and not previous:  # one user message: its chat form directly
        items = [{"type": "message", "role": "user", "content": inp}]
        messages = [{"role": "user", "content": inp}]
        if instructions:
            messages.insert(0, {"role": "system", "content": instructions})
    else:
        items = input_items(inp)
        history = await store.conversation(p, previous) if previous else []
        messages = to_messages(history + items, instructions)
    data = chat_data(req, messages)
    rid = request_id_var.get() or ""
    call = Call(request_id=rid, principal=p, kind="chat", alias=req["model"], chat=chat_request(data),
                metadata=dict(req.get("metadata") or {}))
    gw: Gateway = request.app.state.gateway
    response_id, created = _response_id(rid), int(time.time())
    if not req.get("stream"):
        def answered(result: ChatResult) -> Response:
            out = response_json(response_id, created, req, status="completed",
                                output=output_items(response_id, result), usage=result.usage,
                                finish_reason=result.finish_reason)
            encoded = orjson.dumps(out)
            if out["store"]:
                store.record(p, out, items, encoded)  # the answer's bytes are what is stored
            return JSONAnswer(encoded, answer_headers(call, result.usage))

        return await answer_chat(gw, call, request, answered)
    stream = gw.chat_stream(call)
    first = await first_delta(stream)
    events = Events(response_id, created, req, call)
    return StreamedResponse(events.run(stream, first, store, items), media_type="text/event-stream",
                            headers={**answer_headers(call), "cache-control": "no-cache"})


class Events:
    """One streamed response: chat deltas in, Responses SSE events out, each with its `sequence_number`.
    Text goes to one message item (output_item.added, content_part.added, output_text.delta…, then the
    `.done` events); each tool call to a function_call item (its arguments as deltas); then
    `response.completed` (or `response.incomplete`) with the whole response and its usage."""

    def __init__(self, response_id: str, created: int, body: ResponsesBody | ResponsesRequest, call: Call) -> None:
        self.id, self.created, self.body, self.call = response_id, created, parsed(body), call
        self.suffix = response_id.removeprefix("resp_")
        self.seq = 0
        self.out: list[bytes] = []
        self.items: list[dict[str, Any]] = []  # finished output items, in output order
        self.text: list[str] | None = None  # the open message item's text so far
        self.text_index = 0
        self.calls: dict[int, dict[str, Any]] = {}  # open function_call items by the delta's tool call index
        self.finish: str | None = None
        self._delta_head: bytes | None = None
        self._started = response_json(response_id, created, self.body, status="in_progress", output=[], usage=None)

    def emit(self, kind: str, **fields: Any) -> None:
        fields["type"], fields["sequence_number"] = kind, self.seq
        self.seq += 1
        self.out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(fields) + b"\n\n")

    def emit_response(self, kind: str, response: bytes) -> None:
        """An event whose one field is the response object, given as its JSON (encoded once, used again)."""
        self.out.append(b"event: %s\ndata: {\"type\":\"%s\",\"sequence_number\":%d,\"response\":%s}\n\n"
                        % (kind.encode(), kind.encode(), self.seq, response))
        self.seq += 1

    def take(self) -> bytes:
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def response(self, status: str, usage: Usage | None = None) -> dict[str, Any]:
        return finished(self._started, status=status, output=list(self.items), usage=usage,
                        finish_reason=self.finish)

    # -- text ------------------------------------------------------------------------------------------
    def _open_text(self) -> None:
        self.text, self.text_index = [], len(self.items) + len(self.calls)
        self.emit("response.output_item.added", output_index=self.text_index,
                  item=message_item(f"msg_{self.suffix}", "", status="in_progress"))
        self.emit("response.content_part.added", item_id=f"msg_{self.suffix}", output_index=self.text_index,
                  content_index=0, part={"type": "output_text", "text": "", "annotations": []})

    def _text_delta(self, text: str) -> None:
        """`response.output_text.delta`, the one event per token: its fixed part is serialised once per stream."""
        if self._delta_head is None:
            fixed = orjson.dumps({"type": "response.output_text.delta", "item_id": f"msg_{self.suffix}",
                                  "output_index": self.text_index, "content_index": 0, "logprobs": []})
            self._delta_head = b"event: response.output_text.delta\ndata: " + fixed[:-1] + b',"sequence_number":'
        self.out.append(b"%s%d,\"delta\":%s}\n\n" % (self._delta_head, self.seq, orjson.dumps(text)))
        self.seq += 1

    def _close_text(self) -> None:
        if self.text is None:
            return
        text, item_id, index = "".join(self.text), f"msg_{self.suffix}", self.text_index
        self.emit("response.output_text.done", item_id=item_id, output_index=index, content_index=0, text=text,
                  logprobs=[])
        self.emit("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                  part={"type": "output_text", "text": text, "annotations": []})
        item = message_item(item_id, text)
        self.emit("response.output_item.done", output_index=index, item=item)
        self.items.append(item)
        self.text = None

    # -- function calls --------------------------------------------------------------------------------
    def _tool_delta(self, tc: dict[str, Any]) -> None:
        index = int(tc.get("index") or 0)
        fn = tc.get("function") or {}
        open_call = self.calls.get(index)
        if open_call is None:
            self._close_text()
            open_call = self.calls[index] = {
                "id": f"fc_{self.suffix}_{index}", "call_id": str(tc.get("id") or f"call_{self.suffix}_{index}"),
                "name": str(fn.get("name") or ""), "arguments": [], "output_index": len(self.items) + len(self.calls)}
            self.emit("response.output_item.added", output_index=open_call["output_index"],
                      item=function_item(open_call["id"], open_call["call_id"], open_call["name"], "",
                                         status="in_progress"))
        args = fn.get("arguments")
        if args:
            args = args if isinstance(args, str) else orjson.dumps(args).decode()
            open_call["arguments"].append(args)
            self.emit("response.function_call_arguments.delta", item_id=open_call["id"],
                      output_index=open_call["output_index"], delta=args)

    def _close_calls(self) -> None:
        for c in self.calls.values():
            args = "".join(c["arguments"])
            self.emit("response.function_call_arguments.done", item_id=c["id"], output_index=c["output_index"],
                      arguments=args)
            item = function_item(c["id"], c["call_id"], c["name"], args)
            self.emit("response.output_item.done", output_index=c["output_index"], item=item)
            self.items.append(item)
        self.calls.clear()

    def delta(self, d: ChatDelta) -> None:
        if d.content and self.text is not None and not d.tool_calls and not d.finish_reason:  # the usual token
            self.text.append(d.content)
            self._text_delta(d.content)
            return
        if d.content:
            if self.text is None:
                self._open_text()
            assert self.text is not None
            self.text.append(d.content)
            self._text_delta(d.content)
        for tc in d.tool_calls or ():
            self._tool_delta(tc)
        if d.finish_reason:
            self.finish = d.finish_reason

    async def run(self, stream: AsyncIterator[ChatDelta], first: ChatDelta | None, store: ResponseStore,
                  items: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        """The SSE body. An error after the first byte becomes an `error` event, and the stream ends."""
        started = orjson.dumps(self._started)
        self.emit_response("response.created", started)
        self.emit_response("response.in_progress", started)
        try:
            if first is not None:
                self.delta(first)
                if not first.more:
                    yield self.take()
            async for d in stream:
                self.delta(d)
                if not d.more and self.out:
                    yield self.take()
            if self.text is None and not self.calls and not self.items:
                self._open_text()  # an empty answer is still one (empty) message, as without streaming
            self._close_text()
            self._close_calls()
            final = self.response("completed", self.call.usage)
            encoded = orjson.dumps(final)
            self.emit_response("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                               encoded)
            if final["store"]:
                store.record(self.call.principal, final, items, encoded)
        except KeelError as exc:
            problem = exc.to_problem(self.call.request_id)
            self.emit("error", code=exc.code, message=problem["error"]["message"], param=None, error=problem["error"])
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        yield self.take()


@router.get("/v1/responses/{response_id}", tags=["gateway"])
async def get_response(response_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """A stored response, for its team (a team-less key's: its owner), admins and team-less auditors."""
    row = await _store(request).get(p, response_id)
    return json_response(row["response"])


@router.delete("/v1/responses/{response_id}", tags=["gateway"])
async def delete_response(response_id: str, request: Request, p: Principal = Depends(principal)) -> Response:
    """Delete a stored response: its owner (the key or its user) or an admin."""
    await _store(request).delete(p, response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


def hot_routes() -> dict[tuple[str, str], HotEndpoint]:
    """`POST /v1/responses` ahead of the framework router, like chat completions."""

    def create(body: ResponsesBody | ResponsesRequest, request: Any, p: Principal) -> Awaitable[Response]:
        return _create(body, request, p)

    return {("POST", "/v1/responses"): hot_json_endpoint(ResponsesBody, create, fast_responses_body, principal)}


def mount(app: FastAPI, store: Store) -> None:
    """Serve the Responses API on `app`: its stored responses in `store`, written in the background."""
    responses = ResponseStore(store, retention_days=app.state.settings.responses_retention_days)
    app.state.responses = responses
    app.state.lifecycle.startup.append(responses.start)
    app.state.lifecycle.shutdown.append(responses.stop)
    app.include_router(router)
    app.state.hot_routes.update(hot_routes())
