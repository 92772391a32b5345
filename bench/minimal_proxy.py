"""The Python floor for the gateway benchmark: one aiohttp client session, parse JSON, check a bearer
token, forward to the upstream, return its answer (streaming passed through chunk by chunk)."""

from __future__ import annotations

import argparse

import aiohttp
import orjson
from aiohttp import web


def make_app(upstream: str, token: str) -> web.Application:
    app = web.Application()

    async def start(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))

    async def stop(app: web.Application) -> None:
        await app["session"].close()

    async def chat(request: web.Request) -> web.StreamResponse:
        if request.headers.get("authorization") != f"Bearer {token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        body = orjson.loads(await request.read())
        async with app["session"].post(upstream + "/chat/completions", data=orjson.dumps(body),
                                       headers={"content-type": "application/json"}) as up:
            if not body.get("stream"):
                return web.Response(body=await up.read(), status=up.status, content_type="application/json")
            resp = web.StreamResponse(status=up.status, headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.router.add_post("/v1/chat/completions", chat)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--token", default="bench")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(make_app(args.upstream, args.token), host="127.0.0.1", port=args.port, print=None, access_log=None)
