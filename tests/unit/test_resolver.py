"""The data path's name resolution: cached, refreshed behind, stale on failure."""

from __future__ import annotations

import asyncio
import socket

import pytest

from ha_agent.resolver import CachingResolver


async def test_answers_from_cache_and_keeps_stale_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    answers = {"node-1": "10.0.0.1"}

    def fake_getaddrinfo(host: str, port: int, family: int, type_: int):  # type: ignore[no-untyped-def]
        calls.append(host)
        if host not in answers:
            raise socket.gaierror(f"unknown {host}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    resolver = CachingResolver(ttl=0.0)
    first = await resolver.resolve("node-1", 30000)
    assert first[0]["host"] == "10.0.0.1" and first[0]["port"] == 30000
    del answers["node-1"]  # the name vanishes (container stopped)
    again = await resolver.resolve("node-1", 30000)  # served from cache, refresh behind
    assert again[0]["host"] == "10.0.0.1"
    for _ in range(50):
        if len(calls) >= 2 and not resolver._refreshing:
            break
        await asyncio.sleep(0.01)
    assert (await resolver.resolve("node-1", 30000))[0]["host"] == "10.0.0.1"
    with pytest.raises(OSError):
        await resolver.resolve("never-seen", 1)
    await resolver.close()


async def test_a_hanging_lookup_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    release = threading.Event()

    def slow(host: str, port: int, family: int, type_: int):  # type: ignore[no-untyped-def]
        release.wait(5)
        raise socket.gaierror("late")

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    resolver = CachingResolver(timeout=0.2)
    with pytest.raises(OSError, match="timed out"):
        await resolver.resolve("stuck", 1)
    release.set()
    await resolver.close()
