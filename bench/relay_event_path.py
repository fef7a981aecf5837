"""The relay's Python cost per streamed event, without sockets or an event loop.

    python -m bench.relay_event_path [--events 200000]

Feeds one SGLang chat chunk (HTTP/1.1 chunk framing, the running usage the relay asks
for as its last key) to `passthrough.UpstreamStream.data_received` with the relay's own
sink (`Relay._sink`: the byte scans of `Migration.screen`, the first segment kept for a
migration, the re-framed write) and a client transport that drops what it is given.
What is left out is what no Python change can remove: the loop's wake-up, the `read`
from the engine and the `write` to Nginx. So this is the most a faster (compiled) event
path could save per event; compare it with the gateway's CPU per event (`make
bench-capacity`).
"""

from __future__ import annotations

import argparse
import sys
import timeit
import types
from typing import Any

from ha_agent.gateway.stream import passthrough
from ha_agent.gateway.stream.migration import Migration
from ha_agent.gateway.stream.relay import Relay, _StreamState

# A content chunk as SGLang 0.5.x writes it (sse_utils.py StreamChunk: no tool_calls, a
# None usage omitted), with the running usage of `continuous_usage_stats` as its last key.
CHUNK = (
    b'data: {"id":"1c2b6a8e0b8c4a2e9f0e1d2c3b4a5968","object":"chat.completion.chunk",'
    b'"created":1733550000,"model":"qwen","choices":[{"index":0,"delta":{"role":null,'
    b'"content":" token","reasoning_content":null},"logprobs":null,"finish_reason":null,'
    b'"matched_stop":null}],"usage":{"prompt_tokens":25,"total_tokens":40,'
    b'"completion_tokens":15,"prompt_tokens_details":null,"reasoning_tokens":0}}\n\n'
)


class _DroppingTransport:
    """The client's side: takes every write, never buffers."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def event_path(chunk: bytes = CHUNK) -> tuple[Any, _DroppingTransport, _StreamState]:
    """(a callable that passes one framed event through, the client transport, the state)."""
    migration = Migration("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    client = _DroppingTransport()
    # Only the fields the event path reads: a first segment, its first event already sent.
    state = _StreamState.__new__(_StreamState)
    state.migration, state.migrations, state.attempt = migration, 0, None
    state.client_transport = client  # type: ignore[assignment]
    state._chunked, state._first_event_sent, state.writes = True, True, 0
    state._raw, state._latest_only = [], migration.latest_event_holds_all
    relay = types.SimpleNamespace(topology=types.SimpleNamespace(clock=lambda: 0.0))
    upstream = passthrough.UpstreamStream()
    upstream._head_done, upstream._chunked = True, True
    upstream._sink = Relay._sink(relay, state, upstream)  # type: ignore[arg-type]
    framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)

    def one() -> None:
        upstream.data_received(framed)
        if state._raw is not None and len(state._raw) > 1000:  # a stream's worth, then anew
            state._raw.clear()

    return one, client, state


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    one, client, _ = event_path()
    one()
    if client.written == 0:
        print("the event path wrote nothing to the client", file=sys.stderr)
        return 1
    best = min(timeit.repeat(one, number=args.events, repeat=args.repeat)) / args.events
    print(
        f"relay event path (Python, no sockets): {best * 1e6:.2f} µs per event"
        f" (best of {args.repeat} × {args.events:,} events, Python {sys.version.split()[0]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
