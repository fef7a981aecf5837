import os
if os.environ.get("PATH_OUT"):
    import time, atexit
    from ha_agent.gateway.stream import passthrough as p, relay as r
    from ha_agent.gateway.admission import gate as g
    from ha_agent.gateway.stream import spares as sp
    marks = {}
    rows = []
    cur = {}
    from aiohttp import web_protocol as wp
    orig_dr = wp.RequestHandler.data_received
    def dr(self, data):
        if 'd0' not in cur: cur['d0'] = time.perf_counter_ns()
        return orig_dr(self, data)
    wp.RequestHandler.data_received = dr
    orig_cm = wp.RequestHandler.connection_made
    def cm(self, t):
        cur['c0'] = time.perf_counter_ns()
        return orig_cm(self, t)
    wp.RequestHandler.connection_made = cm
    orig_handle = r.Relay.handle
    async def handle(self, request):
        cur['t0'] = time.perf_counter_ns()
        return await orig_handle(self, request)
    r.Relay.handle = handle
    orig_rb = None
    orig_admit = g.Admission.admit
    async def admit(self, *a, **k):
        cur['a0'] = time.perf_counter_ns()
        res = await orig_admit(self, *a, **k)
        cur['a1'] = time.perf_counter_ns()
        return res
    g.Admission.admit = admit
    orig_send = p.send
    def send(proto, *a, **k):
        t = time.perf_counter_ns(); res = orig_send(proto, *a, **k); t2 = time.perf_counter_ns()
        if 't0' in cur and 'a1' in cur:
            rows.append((cur['t0'] - cur.get('d0', cur['t0']), cur.get('d0', 0) - cur.get('c0', cur.get('d0', 0)), cur['a0'] - cur['t0'], cur['a1'] - cur['a0'], t - cur['a1'], t2 - t))
        cur.clear(); return res
    p.send = send
    def dump():
        if rows:
            with open(os.environ["PATH_OUT"] + f".{os.getpid()}", "w") as f:
                for i, name in enumerate(("data->handle", "conn->data", "handle->admit", "admit", "admit->send", "send")):
                    s = sorted(x[i] / 1e3 for x in rows); n = len(s)
                    f.write("%-14s n %d p50 %.0f p90 %.0f p99 %.0f us\n" % (name, n, s[n//2], s[int(n*.9)], s[int(n*.99)]))
    atexit.register(dump)
