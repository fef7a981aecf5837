"""HTTP/1.1 over a bare socket: requests no client library would send (raw paths,
bad bytes in a header, oversized request lines), to check what the edge answers."""

from __future__ import annotations

import asyncio


def framed(head: str, body: bytes = b"") -> bytes:
    """A request from its request line and headers (each ending in CRLF) and a body:
    Content-Length and `Connection: close` added, so the answer ends the stream."""
    return (head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


async def raw_http(
    port: int, request: bytes, *, host: str = "127.0.0.1", timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as it is and read until the server closes: status, headers
    (lower-case names), body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout=timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body
