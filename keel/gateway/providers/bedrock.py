"""AWS Bedrock through the Converse API: `POST /model/{modelId}/converse` and `/converse-stream`, signed with
SigV4 by botocore's public signer (`botocore.auth.SigV4Auth` over a `botocore.awsrequest.AWSRequest`), the
stream read with botocore's event stream parser (`botocore.eventstream.EventStreamBuffer`: AWS's binary
framing with its CRCs, the same parser boto3 reads `converse_stream` with); OpenAI shapes in and out.

The credential is a vault secret holding JSON `{"access_key_id", "secret_access_key", "session_token"?}`
(signed with SigV4), or a Bedrock API key (any other text: sent as a bearer token). The region comes from
`options.region`, else from the base URL's host (`bedrock-runtime.<region>.amazonaws.com`), else us-east-1.

JSON mode raises `NotSupported` (Converse has no such switch), and so does `n` > 1.

>>> p = BedrockProvider(DeploymentConfig(alias="claude", provider="bedrock", credential="aws",
...     model="anthropic.claude-3-5-haiku-20241022-v1:0", options={"region": "eu-west-1"}), ctx)
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar
from urllib.parse import quote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer, ParserError
from yarl import URL

from keel.core.errors import BadRequest, ConfigError, KeelError, NotSupported
from keel.core.http1 import Response, WireError
from keel.core.settings import DeploymentConfig
from keel.gateway.protocol import ChatDelta, ChatRequest, ChatResult, EmbedResult, ProviderContext, Usage
from keel.gateway.providers.openai_compatible import PARSE_ERRORS, HTTPProvider

STOP_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                "guardrail_intervened": "content_filter", "content_filtered": "content_filter"}
EXCEPTION_STATUS = {"throttlingException": 429, "validationException": 400, "accessDeniedException": 403,
                    "resourceNotFoundException": 404, "serviceUnavailableException": 503,
                    "internalServerException": 500, "modelStreamErrorException": 502, "modelTimeoutException": 504,
                    "modelNotReadyException": 503}
REGION = re.compile(r"bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com")
REGION_NAME = re.compile(r"[a-z]{2}(?:-[a-z]+)+-\d{1,2}")  # us-east-1, eu-central-2, us-gov-west-1


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI content → Converse content blocks: text, and images given inline as data: URLs."""
    if not isinstance(content, list):
        return [{"text": content}] if content else []
    blocks = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            if part.get("text"):
                blocks.append({"text": part["text"]})
        elif kind == "image_url" and part["image_url"]["url"].startswith("data:image/"):
            header, _, data = part["image_url"]["url"].partition(",")
            blocks.append({"image": {"format": header[11:].split(";")[0], "source": {"bytes": data}}})
        else:
            raise NotSupported(f"message part {kind!r} is not supported by the bedrock provider",
                               fix="send text parts, or images as data:image/… URLs")
    return blocks


def _result(content: Any) -> list[dict[str, Any]]:
    text = _text(content)
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return [{"text": text}]
    return [{"json": value}] if isinstance(value, dict) else [{"text": text}]


def translate_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI messages → (Converse `system` blocks, `messages`), consecutive turns of one role merged (the API
    wants them alternating)."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})

    for m in messages:
        role = m.get("role")
        if role in ("system", "developer"):
            if text := _text(m.get("content")):
                system.append({"text": text})
        elif role == "assistant":
            blocks = _blocks(m.get("content"))
            for call in m.get("tool_calls") or ():
                raw = call["function"].get("arguments") or "{}"
                try:
                    args = raw if isinstance(raw, dict) else orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise BadRequest("an assistant tool_call has arguments that are not valid JSON",
                                     fix="send the function arguments as a JSON object string") from None
                blocks.append({"toolUse": {"toolUseId": call["id"], "name": call["function"]["name"], "input": args}})
            add("assistant", blocks)
        elif role == "tool":
            add("user", [{"toolResult": {"toolUseId": m["tool_call_id"], "content": _result(m.get("content")),
                                         "status": "success"}}])
        elif role == "user":
            add("user", _blocks(m.get("content")))
        else:
            raise BadRequest(f"message role {role!r} is not supported", fix="use system, user, assistant or tool")
    return system, out


def credentials(secret: str) -> Credentials | None:
    """SigV4 credentials from a JSON secret, or None when the secret is a Bedrock API key (a bearer token)."""
    if not secret.lstrip().startswith("{"):
        return None
    try:
        data = orjson.loads(secret)
        return Credentials(data["access_key_id"], data["secret_access_key"], data.get("session_token"))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise ConfigError("the bedrock credential is JSON without access_key_id and secret_access_key",
                          fix='store {"access_key_id": …, "secret_access_key": …, "session_token": …} '
                              "or a Bedrock API key") from None


class BedrockProvider(HTTPProvider):
    """Calls Bedrock's Converse API, SigV4-signed per request."""

    name: ClassVar[str] = "bedrock"
    supports_tools: ClassVar[bool] = True
    supports_json_mode: ClassVar[bool] = False
    can_stream: ClassVar[bool] = True
    can_embed: ClassVar[bool] = False

    def __init__(self, config: DeploymentConfig, ctx: ProviderContext) -> None:
        super().__init__(config, ctx)
        found = REGION.search(self.base_url)
        self.region = str(config.options.get("region") or (found.group(1) if found else "us-east-1"))
        if not self.base_url:
            self.base_url = f"https://bedrock-runtime.{self.region}.amazonaws.com"
        root = f"{self.base_url}/model/{quote(config.model, safe='')}"
        self.chat_url, self.stream_url = f"{root}/converse", f"{root}/converse-stream"
        self._creds: Credentials | None = None

    @classmethod
    def check_options(cls, config: DeploymentConfig) -> None:
        """A model id, and `options.region` (when given) spelled as an AWS region."""
        if not config.model:
            raise ConfigError("model: bedrock needs model, a model or inference profile id",
                              fix="set model, e.g. anthropic.claude-3-5-haiku-20241022-v1:0", field="model")
        region = config.options.get("region")
        if region is not None and not (isinstance(region, str) and REGION_NAME.fullmatch(region)):
            raise ConfigError(f"options.region: {str(region)[:100]!r} is not an AWS region",
                              fix="set options.region to the region's code, e.g. us-east-1 or eu-west-1, or leave it "
                                  "out to take it from base_url (else us-east-1)", field="options.region")
        super().check_options(config)

    def auth_headers(self, secret: str | None) -> dict[str, str]:
        """SigV4 headers are made per request (`_send`); only a Bedrock API key is a fixed header."""
        if not secret:
            return {}
        try:
            self._creds = credentials(secret)
        except ConfigError as exc:
            raise ConfigError(f"deployment {self.deployment}: {exc.detail}", fix=exc.fix,
                              deployment=self.deployment) from None
        return {} if self._creds else {"Authorization": f"Bearer {secret}"}

    async def _send(self, url: str, body: dict[str, Any]) -> Response:
        client, headers = self._get_client(), self._request_headers()
        data = orjson.dumps(body)
        if self._creds is not None:
            signed = AWSRequest(method="POST", url=url, data=data, headers=headers)
            SigV4Auth(self._creds, "bedrock", self.region).add_auth(signed)
            headers = dict(signed.headers.items())
        # The path is sent exactly as signed: the model id percent-encoded once (`encoded=True`).
        return await client.request("POST", URL(url, encoded=True), headers=headers, body=data, proxy=self._proxy)

    def _body(self, req: ChatRequest) -> dict[str, Any]:
        try:
            return self._translate(req)
        except PARSE_ERRORS as exc:
            raise BadRequest(f"the request cannot be translated for Bedrock ({type(exc).__name__}: {exc})",
                             fix="send OpenAI-shaped messages, tools and tool_choice",
                             deployment=self.deployment) from None

    def _translate(self, req: ChatRequest) -> dict[str, Any]:
        if (req.response_format or {}).get("type") in ("json_object", "json_schema"):
            raise NotSupported(f"deployment {self.deployment} (bedrock) has no JSON mode",
                               fix="route JSON-mode requests to another deployment, or ask for JSON in the prompt",
                               deployment=self.deployment)
        if (req.body.get("n") or 1) > 1:
            raise NotSupported(f"deployment {self.deployment} (bedrock) returns one choice only",
                               fix="send n=1 and repeat the request", deployment=self.deployment)
        system, messages = translate_messages(req.messages)
        body: dict[str, Any] = {"messages": messages}
        if system:
            body["system"] = system
        config: dict[str, Any] = {}
        for key, value in (("maxTokens", req.max_tokens or req.body.get("max_completion_tokens")),
                           ("temperature", req.temperature), ("topP", req.top_p)):
            if value is not None:
                config[key] = value
        if req.stop:
            config["stopSequences"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if config:
            body["inferenceConfig"] = config
        used = any("toolUse" in b or "toolResult" in b for m in messages for b in m["content"])
        if req.tools and (req.tool_choice != "none" or used):  # the API refuses tool blocks without toolConfig
            tools = [{"toolSpec": {k: v for k, v in (
                ("name", t["function"]["name"]), ("description", t["function"].get("description")),
                ("inputSchema", {"json": t["function"].get("parameters") or {"type": "object"}})) if v}}
                for t in req.tools]
            body["toolConfig"] = {"tools": tools}
            choice = req.tool_choice
            if choice == "required":
                body["toolConfig"]["toolChoice"] = {"any": {}}
            elif isinstance(choice, dict):
                body["toolConfig"]["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
            elif choice == "auto":
                body["toolConfig"]["toolChoice"] = {"auto": {}}
        return body

    async def chat(self, req: ChatRequest) -> ChatResult:
        data = await self._post_json(self.chat_url, self._body(req))
        try:
            text, calls = [], []
            for block in data["output"]["message"]["content"]:
                if "text" in block:
                    text.append(block["text"])
                elif use := block.get("toolUse"):
                    calls.append({"id": use["toolUseId"], "type": "function", "function": {
                        "name": use["name"], "arguments": orjson.dumps(use.get("input") or {}).decode()}})
            usage = data["usage"]
            counted = Usage(int(usage.get("inputTokens") or 0), int(usage.get("outputTokens") or 0))
        except PARSE_ERRORS as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        return ChatResult(content="".join(text) if text or not calls else None,
                          finish_reason=STOP_REASONS.get(data.get("stopReason"), "stop"), usage=counted,
                          tool_calls=calls or None, model=self.config.model)

    def stream(self, req: ChatRequest) -> AsyncIterator[ChatDelta]:
        return self._stream(self._body(req))

    async def _events(self, resp: Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(event type, payload) of each event stream message; an exception message raises its Keel error."""
        buffer = EventStreamBuffer()
        while True:
            async with asyncio.timeout(self.config.timeout_s):
                chunk = await resp.read_some()
            if not chunk:
                return
            buffer.add_data(chunk)
            for message in buffer:
                headers, payload = message.headers, orjson.loads(message.payload or b"{}")
                if headers.get(":message-type") == "exception":
                    kind = str(headers.get(":exception-type") or "")
                    raise self._fail(EXCEPTION_STATUS.get(kind, 500), str(payload.get("message") or kind))
                if headers.get(":message-type") == "event":
                    yield str(headers.get(":event-type")), payload

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[ChatDelta]:
        tools: dict[int, int] = {}  # contentBlockIndex → OpenAI tool_calls index
        finish = None
        resp = None
        try:
            async with asyncio.timeout(self.config.timeout_s):
                resp = await self._send(self.stream_url, body)
                if resp.status >= 400:
                    raise self._status_error(resp, await resp.read())
            async for kind, ev in self._events(resp):
                if kind == "messageStart":
                    yield ChatDelta(role="assistant")
                elif kind == "contentBlockStart" and (use := (ev.get("start") or {}).get("toolUse")):
                    index = tools[ev["contentBlockIndex"]] = len(tools)
                    yield ChatDelta(tool_calls=[{"index": index, "id": use["toolUseId"], "type": "function",
                                                 "function": {"name": use["name"], "arguments": ""}}])
                elif kind == "contentBlockDelta":
                    delta = ev["delta"]
                    if "text" in delta:
                        yield ChatDelta(content=delta["text"])
                    elif "toolUse" in delta:
                        yield ChatDelta(tool_calls=[{"index": tools[ev["contentBlockIndex"]],
                                                     "function": {"arguments": delta["toolUse"]["input"]}}])
                elif kind == "messageStop":
                    finish = STOP_REASONS.get(ev.get("stopReason"), "stop")
                elif kind == "metadata" and finish is not None:
                    usage = ev.get("usage") or {}
                    yield ChatDelta(finish_reason=finish, usage=Usage(int(usage.get("inputTokens") or 0),
                                                                      int(usage.get("outputTokens") or 0)))
                    await self._drain(resp)  # to the body's end, so the connection goes back to the pool
                    return
            if finish is None:
                raise self._malformed("the stream ended before messageStop")
            yield ChatDelta(finish_reason=finish)  # no metadata event: the usage is unknown
        except KeelError:
            raise
        except TimeoutError:
            raise self._fail(None, "", timeout=True) from None
        except WireError as exc:
            raise self._client_error(exc) from None
        except (ParserError, *PARSE_ERRORS) as exc:
            raise self._malformed(f"{type(exc).__name__}: {exc}") from None
        finally:
            if resp is not None:
                resp.close()  # a body not read to its end closes its connection

    async def embed(self, texts: list[str]) -> EmbedResult:
        raise NotSupported(f"deployment {self.deployment} (bedrock) cannot embed through the Converse API",
                           fix="use an embedding deployment (local_embed or openai_compatible)",
                           deployment=self.deployment)
