"""The gateway: Nginx at the edge in front of leader-aware relay workers.

Four jobs, one subpackage each, in the order a request meets them:

- `edge/`: what surrounds the relay processes — Nginx's rendered config and its
  upstream list kept in sync, the worker count, the watchdog that takes a frozen
  worker out of rotation, access-log rotation;
- `admission/`: what is checked before an engine sees a request — field policy,
  size limits (the streaming prompt scanner), shedding, query-of-death quarantine;
- `stream/`: the request path itself — the relay, SSE framing, the zero-copy
  pass-through of a stream's bytes and the migration of a broken stream to another node;
- `upstream/`: the relay's view of the nodes — topology from the store and the
  agents, the HTTP transport to the engines, and the warmer that keeps the
  standby's cache warm.

`service.py` wires them into one process (`__main__.py`); `admin.py`, `metrics.py`
and `errors.py` serve all four.
"""
