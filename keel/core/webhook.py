"""JSON webhook POSTs through Keel's outbound stack (review decisions, drift alerts, budget alerts).

>>> status = await post_json_once(outbound, tls, "https://hooks.example.com/keel", {"type": "drift.detected"},
...                               timeout_s=10)
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any

import orjson
from yarl import URL

from keel.core.errors import ConfigError
from keel.core.http1 import Client, ConnectFailed, Proxy
from keel.core.outbound import USER_AGENT, Outbound


async def post_json(client: Client, url: str | URL, body: Any, *, proxy: Proxy | None, timeout_s: float,
                    headers: Mapping[str, str] | None = None) -> int:
    """POST `body` as JSON to `url` within `timeout_s`; the answer's status (its body is not read). Raises
    `WireError`, `ValueError` (a URL or header that cannot be sent), `TimeoutError` or `OSError`."""
    target = URL(url)
    data = orjson.dumps(body)
    sent = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    async with asyncio.timeout(timeout_s):
        resp = await client.request("POST", target, headers=sent, body=data, proxy=proxy)
    resp.close()
    return resp.status


async def post_json_once(outbound: Outbound, tls: ssl.SSLContext | bool, url: str, body: Any, *,
                         timeout_s: float) -> int:
    """`post_json` through the environment's proxy for `url`, on a one-connection client made for this call."""
    try:
        proxy = outbound.proxy_for(url)
    except ConfigError as exc:  # the environment's proxy cannot be used: the delivery fails, as a refused one would
        raise ConnectFailed(exc.detail) from None
    client = outbound.client(limit=1, tls=tls)
    try:
        return await post_json(client, url, body, proxy=proxy, timeout_s=timeout_s)
    finally:
        await client.close()
