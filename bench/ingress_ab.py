"""The API shapes against each other on one Keel: chat completions (the baseline), Responses (stored, the
default, and `store: false`) and legacy completions, same prompt, same upstream, rounds interleaved so the
machine's drift hits every shape alike. Load from `wrk` at concurrency 50; Keel's CPU per request from
its process times. Prints ONE JSON line, with each shape's ratio to chat completions.

    .venv/bin/python bench/ingress_ab.py [--rounds 2] [--seconds 3] [--stream]
    .venv/bin/python bench/ingress_ab.py --translate

About 30 s with the defaults. Needs `wrk`; reuses `bench/gateway.py`'s Keel, upstream and wrk helpers.
`--translate` measures, in this process and without a server, the CPU each shape's own work takes per
request (parse and translate the body, build the answer; a stream's events for 15 tokens): the figure
that stays put on a busy machine, where the wrk ratios swing by ±20 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gateway import PY, ROOT, cpu_s, free_port, start_keel, stop, wait_http, wrk  # noqa: E402

PROMPT = "Say hello in five words."


def shapes(stream: bool) -> dict[str, tuple[str, dict]]:
    """name → (path, body): what `bench/gateway.py`'s chat body asks, in each shape."""
    return {
        "chat": ("/v1/chat/completions", {"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
                                          "max_tokens": 16, "stream": stream}),
        "responses": ("/v1/responses", {"model": "bench", "input": PROMPT, "max_output_tokens": 16, "stream": stream}),
        "responses_nostore": ("/v1/responses", {"model": "bench", "input": PROMPT, "max_output_tokens": 16,
                                                "store": False, "stream": stream}),
        "completions": ("/v1/completions", {"model": "bench", "prompt": PROMPT, "max_tokens": 16, "stream": stream}),
    }


def translate() -> dict:
    """Best-of-5 CPU µs per request of each shape's own work around the same chat call and answer."""
    import asyncio
    import time

    import orjson

    from keel.gateway.ingress import completions as cmpl
    from keel.gateway.ingress import responses_shape as rs
    from keel.gateway.ingress.responses import Events
    from keel.gateway.pipeline import Call
    from keel.gateway.protocol import ChatDelta, ChatResult, Usage
    from keel.gateway.routes import chat_request, completion_json
    from keel.gateway.schemas import fast_chat_body
    from keel.identity.principal import Principal

    who = Principal(key_id="k", role="member")
    result = ChatResult(content="Hello from the fake upstream. It answers", finish_reason="stop", usage=Usage(10, 8))
    bodies = {name: orjson.dumps(body) for name, (_, body) in shapes(False).items()}
    words = [ChatDelta(content=w + " ") for w in "Hello from the fake upstream. It answers quickly and well".split()]

    def call(req=None) -> Call:  # noqa: ANN001
        return Call(request_id="req_x", principal=who, kind="chat", alias="bench", chat=req)

    def chat() -> bytes:
        return orjson.dumps(completion_json(call(chat_request(fast_chat_body(orjson.loads(bodies["chat"])))), result))

    def responses() -> bytes:
        b = rs.ResponsesBody.model_validate(orjson.loads(bodies["responses"]))
        rs.check_supported(b)
        chat_request(rs.chat_data(b, rs.to_messages(rs.input_items(b.input), b.instructions)))
        return orjson.dumps(rs.response_json("resp_x", 1, b, status="completed", output=rs.output_items("resp_x", result),
                                             usage=result.usage, finish_reason="stop"))

    def completions() -> bytes:
        b = cmpl.CompletionsBody.model_validate(orjson.loads(bodies["completions"]))
        c = call(chat_request(cmpl.chat_data(b, cmpl.prompts(b)[0])))
        return cmpl.text_completion(c, "req_x", 1, [result], result.usage).body

    loop = asyncio.new_event_loop()

    async def deltas():  # noqa: ANN202
        for d in [*words, ChatDelta(finish_reason="stop", usage=Usage(10, 15))]:
            yield d

    class NoStore:
        def record(self, *_: object) -> None: ...

    def chat_stream() -> list[bytes]:
        from keel.gateway.routes import _sse  # noqa: PLC0415 (this bench's subject)

        async def run() -> list[bytes]:
            return [x async for x in _sse(call(), deltas(), ChatDelta(role="assistant", content=""))]
        return loop.run_until_complete(run())

    def responses_stream() -> list[bytes]:
        b = rs.ResponsesBody.model_validate({"model": "bench", "input": PROMPT, "stream": True, "store": False})

        async def run() -> list[bytes]:
            events = Events("resp_x", 1, b, call())
            return [x async for x in events.run(deltas(), ChatDelta(role="assistant", content=""), NoStore(), [])]
        return loop.run_until_complete(run())

    out = {}
    for fn in (chat, responses, completions, chat_stream, responses_stream):
        for _ in range(300):
            fn()
        best = 1e9
        for _ in range(5):
            t = time.process_time()
            for _ in range(1000):
                fn()
            best = min(best, (time.process_time() - t) / 1000 * 1e6)
        out[fn.__name__] = round(best, 1)
    loop.close()
    return {"translate_cpu_us": out, "added_us": {"responses": round(out["responses"] - out["chat"], 1),
                                                  "completions": round(out["completions"] - out["chat"], 1),
                                                  "responses_stream": round(out["responses_stream"] - out["chat_stream"], 1)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--translate", action="store_true", help="the shapes' own CPU per request, in process")
    args = ap.parse_args()
    if args.translate:
        print(json.dumps(translate()))
        return
    tmp = Path(tempfile.mkdtemp(prefix="keel-ingress-ab-"))
    port = free_port()
    upstream = subprocess.Popen([PY, "-m", "tests.fakes.openai_upstream", "--port", str(port), "--latency-ms",
                                 str(args.latency_ms)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cases = shapes(args.stream)
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    try:
        wait_http(f"http://127.0.0.1:{port}/_stats")
        proc, url, key = start_keel(tmp, f"http://127.0.0.1:{port}/v1")
        try:
            for path, body in cases.values():
                wrk(url + path, key, body, 10, 1, tmp)  # warm-up
            for _ in range(args.rounds):
                for name, (path, body) in cases.items():
                    before = cpu_s(proc.pid)
                    r = wrk(url + path, key, body, 50, args.seconds, tmp)
                    r["cpu_us_per_req"] = round((cpu_s(proc.pid) - before) / max(r["rps"] * args.seconds, 1) * 1e6, 1)
                    runs[name].append(r)
        finally:
            stop(proc)
    finally:
        stop(upstream)
    out: dict = {"stream": args.stream, "rounds": args.rounds}
    for name, rs in runs.items():
        out[name] = {"rps_c50": max(r["rps"] for r in rs), "p50_ms": statistics.median(r["p50_ms"] for r in rs),
                     "cpu_us_per_req": statistics.median(r["cpu_us_per_req"] for r in rs),
                     "errors": sum(r["errors"] for r in rs)}
    base = out["chat"]
    out["ratios"] = {name: {"rps": round(out[name]["rps_c50"] / base["rps_c50"], 3),
                            "cpu": round(out[name]["cpu_us_per_req"] / base["cpu_us_per_req"], 3)} for name in cases}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
