"""300 chat-completion POSTs to aiohttp_bare_server.py, one connection each (as Nginx
sends to the relay: no upstream keep-alive), 25 ms apart (the light-latency phase's
pace of about one request per TTFT)."""

from __future__ import annotations

import socket
import time

BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)

for _ in range(300):
    with socket.create_connection(("127.0.0.1", 18123)) as conn:
        conn.sendall(REQUEST)
        while conn.recv(65536):
            pass
    time.sleep(0.025)
