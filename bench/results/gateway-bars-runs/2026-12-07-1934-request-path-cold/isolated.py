"""parse_json and check_body on the light-latency phase's body in a tight loop (warm
caches), for comparison with the same calls on the relay's request path."""

from __future__ import annotations

import json
import timeit

from ha_agent.openapi import inference

BODY = json.dumps(
    {
        "model": "default",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 32,
        "stream": True,
        "ignore_eos": True,
    }
).encode()
N = 20000
for name, fn in (
    ("parse_json", lambda: inference.parse_json(BODY)),
    ("parse_json + check_body", lambda: inference.check_body("chat", inference.parse_json(BODY))),
):
    best = min(timeit.repeat(fn, number=N, repeat=5)) / N * 1e6
    print(f"{name}: {best:.1f} us a call (best of 5 x {N})")
