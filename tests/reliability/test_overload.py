"""Overload and disconnect storms: every excess request gets 429 with Retry-After at once, every admitted
stream completes whole, and dropped streams give back every KV block with memory flat over rounds."""

from __future__ import annotations

import asyncio
import json
import resource

import httpx
from server_harness import run_live_server, wait_for

from kiln.clients.thread import AsyncEngine

BODY = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True, "stream": True}


async def _stream(client: httpx.AsyncClient, url: str) -> tuple[int, str | None, int | None]:
    """(status, Retry-After, completion tokens of a stream that ended with usage and [DONE])."""
    body = {**BODY, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.headers.get("retry-after"), None
        payloads = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    whole = payloads[-1] == "[DONE]" and "usage" in json.loads(payloads[-2])
    return 200, None, json.loads(payloads[-2])["usage"]["completion_tokens"] if whole else None


def test_overload_is_refused_at_once_and_what_is_admitted_completes(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny", max_waiting_sequences=24) as live:

        async def burst() -> list[tuple[int, str | None, int | None]]:
            limits = httpx.Limits(max_connections=240)
            async with httpx.AsyncClient(timeout=120, limits=limits) as client:
                return await asyncio.gather(*(_stream(client, live.url) for _ in range(240)))

        results = asyncio.run(burst())
        served = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] != 200]
        assert len(served) >= 24 and refused, (len(served), len(refused))
        assert all(tokens == 8 for _, _, tokens in served)  # none truncated
        assert all(status == 429 and retry == "1" for status, retry, _ in refused)
        assert wait_for(lambda: tiny_engine.stats().kv_blocks_used == 0)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_disconnect_storms_free_every_block_and_memory_stays_flat(tiny_engine: AsyncEngine) -> None:
    with run_live_server(tiny_engine, served_model_name="tiny") as live:

        async def storm() -> None:
            async with httpx.AsyncClient(timeout=60) as client:

                async def drop() -> None:
                    body = {**BODY, "max_tokens": 200}
                    async with client.stream("POST", f"{live.url}/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                return  # gone after the first token

                await asyncio.gather(*(drop() for _ in range(40)))

        rss = []
        for _ in range(12):
            asyncio.run(storm())
            assert wait_for(lambda: tiny_engine.stats().kv_blocks_used == 0), (
                "a dropped stream kept its blocks"
            )
            rss.append(_rss_mib())
        # After a few rounds to warm up allocators and caches, 8 more rounds of 40 drops each must not grow.
        assert rss[-1] - rss[3] < 40, rss
