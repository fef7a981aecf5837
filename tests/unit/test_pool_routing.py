"""Pool-mode routing in the relay: spread by requests in flight, prefix affinity
within a load bound, survivors on failure, the warmer's heir (affinity.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ha_agent.config import HaMode, RelaySettings
from ha_agent.dcs.base import EngineState, Role
from ha_agent.gateway.upstream.affinity import Affinity, affinity_of
from ha_agent.gateway.upstream.topology import Abandonable, Topology
from ha_agent.gateway.upstream.warming import Warmer
from ha_agent.openapi.endpoints import CHAT, GENERATE
from tests.support.fakes import FakeStore, agent_status, settled_topology

NAMES = ("sglang-01", "sglang-02", "sglang-03")
BLOCK = 256


class Work(Abandonable):
    def abandon(self, reason: str) -> None:
        pass


def pool(**settings: Any) -> Topology:
    s = RelaySettings(
        mode=HaMode.POOL,
        nodes=[f"{n}=http://{n}:30000=http://{n}:8008" for n in NAMES],
        redis_url="redis://unused",
        **settings,
    )
    t = settled_topology(s)
    for name, node in t.nodes.items():
        role = Role.PRIMARY if name == "sglang-01" else Role.STANDBY
        node.status = agent_status(name, role, mode="pool", serving=True)
    return t


def load(t: Topology, name: str, n: int) -> None:
    for _ in range(n):
        t.nodes[name].inflight.add(Work())


def chat(*turns: str) -> dict[str, Any]:
    roles = ("user", "assistant")
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]
    return {"model": "m", "messages": messages}


def key(body: dict[str, Any], kind: str = CHAT) -> Affinity:
    return affinity_of(kind, body, BLOCK, 32768)


def first(t: Topology, affinity: Affinity | None, exclude: frozenset[str] = frozenset()) -> str:
    return t.routing_order(exclude=exclude, affinity=affinity)[0].name


def doc(i: int) -> str:
    return f"Document {i:04d}. " + "lorem ipsum dolor " * 40


def test_requests_without_a_prefix_go_to_the_least_loaded_node() -> None:
    t = pool()
    load(t, "sglang-01", 3)
    load(t, "sglang-02", 1)
    load(t, "sglang-03", 2)
    assert first(t, key({"text": "short"}, GENERATE)) == "sglang-02"
    assert first(t, None) == "sglang-02"


def test_distinct_prefixes_spread_over_every_node() -> None:
    t = pool()
    homes = Counter(first(t, key(chat(doc(i) + "question"))) for i in range(600))
    assert set(homes) == set(NAMES)
    assert all(150 <= n <= 250 for n in homes.values()), homes


def test_a_conversation_returns_to_the_node_that_holds_it() -> None:
    t = pool()
    turn1 = chat(doc(1) + "What is this about?")
    node = t.routing_order(affinity=key(turn1))[0]
    t.sent(node, key(turn1))
    load(t, node.name, 1)  # it is busy, but within the bound
    turn2 = chat(doc(1) + "What is this about?", "It is about lorem ipsum. " * 10, "Why?")
    assert first(t, key(turn2)) == node.name


def test_the_learned_home_wins_over_the_ring() -> None:
    t = pool()
    body = chat(doc(7) + "q")
    ring_home = first(t, key(body))
    other = next(n for n in NAMES if n != ring_home)
    t.sent(t.nodes[other], key(body))  # it spilled there earlier: its cache holds it now
    assert first(t, key(body)) == other


def test_every_relay_worker_finds_the_same_home() -> None:
    a, b = pool(), pool()
    for i in range(50):
        affinity = key(chat(doc(i) + "q"))
        assert first(a, affinity) == first(b, affinity)


def test_a_home_over_the_load_bound_spills_to_the_next_node_on_the_ring() -> None:
    t = pool(affinity_load_factor=1.25, affinity_load_slack=2)
    affinity = key(chat(doc(3) + "q"))
    order = [n.name for n in t.routing_order(affinity=affinity)]
    home, heir = order[0], order[1]
    # 4 in flight at home, 0 elsewhere: bound = ceil(1.25 * 5 / 3) + 2 = 5; 4 + 1 fits.
    load(t, home, 4)
    assert first(t, affinity) == home
    # 5 in flight: bound = ceil(1.25 * 6 / 3) + 2 = 5; 5 + 1 does not.
    load(t, home, 1)
    assert first(t, affinity) == heir


def test_no_node_is_loaded_past_the_bound_by_one_hot_prefix() -> None:
    t = pool(affinity_load_factor=1.25, affinity_load_slack=4)
    affinity = key(chat(doc(9) + "everyone asks the same"))
    for _ in range(90):
        node = t.routing_order(affinity=affinity)[0]
        load(t, node.name, 1)
    counts = {name: len(n.inflight) for name, n in t.nodes.items()}
    assert max(counts.values()) <= 42, counts  # ceil(1.25 * 90 / 3) + 4
    assert min(counts.values()) > 0, "the spill reaches every node, in ring order"


def test_a_home_with_a_queue_yields_to_a_node_without_one() -> None:
    t = pool()
    affinity = key(chat(doc(4) + "q"))
    home = first(t, affinity)
    t.nodes[home].status = agent_status(home, mode="pool", serving=True, queued=2)
    assert first(t, affinity) != home, "free slots elsewhere beat a cached prefix"
    # Every engine queues: the queue says nothing about where to go; affinity again.
    for name in NAMES:
        t.nodes[name].status = agent_status(name, mode="pool", serving=True, queued=2)
    assert first(t, affinity) == home


def test_a_failed_node_gets_nothing_and_its_prefixes_go_to_its_heir() -> None:
    t = pool()
    affinity = key(chat(doc(5) + "q"))
    home, heir = (n.name for n in t.routing_order(affinity=affinity)[:2])
    # A retry or a migration away from it: the ring's next node, as the warmer assumes.
    assert first(t, affinity, exclude=frozenset({home})) == heir
    # The agent reports the engine hung: out of every order at once (last resort aside).
    node = t.nodes[home]
    node.status = agent_status(home, engine=EngineState.HUNG, mode="pool", serving=False)
    t._judge_failures()
    assert node.failed
    order = t.routing_order(affinity=affinity)
    assert order[0].name == heir and order[-1].name == home


def test_a_node_out_of_service_waits_behind_the_serving_ones() -> None:
    t = pool()
    t.nodes["sglang-02"].status = agent_status("sglang-02", mode="pool", serving=False)
    now = t.clock()
    assert not t.nodes["sglang-02"].can_serve(now), "rejoin damping: no new requests yet"
    for i in range(30):
        order = t.routing_order(affinity=key(chat(doc(i) + "q")))
        assert order[-1].name == "sglang-02"


async def test_a_store_outage_leaves_every_serving_node_in_the_routing() -> None:
    t = pool()
    store = t.store
    assert isinstance(store, FakeStore)

    async def agents_answer() -> None:  # the agents still answer the relay's polls
        return None

    t._poll_agents = agents_answer  # type: ignore[method-assign]
    store.down = True
    await t.refresh()
    assert t.degraded
    homes = {first(t, key(chat(doc(i) + "q"))) for i in range(60)}
    assert homes == set(NAMES), "routing does not depend on the lease or the store"


def test_pair_mode_routes_to_the_primary_whatever_the_prompt() -> None:
    s = RelaySettings(
        nodes=[f"{n}=http://{n}:30000=http://{n}:8008" for n in NAMES], redis_url="redis://unused"
    )
    t = settled_topology(s)
    load(t, "sglang-01", 10)
    for i in range(10):
        assert first(t, key(chat(doc(i) + "q"))) == "sglang-01"


@pytest.mark.parametrize("heirs_busy", [False, True])
async def test_the_warmer_mirrors_to_the_node_that_would_inherit_the_prefix(
    heirs_busy: bool,
) -> None:
    t = pool()
    body = chat(doc(11) + "q")
    affinity = key(body)
    holder = t.routing_order(affinity=affinity)[0]
    t.sent(holder, affinity)
    heir = first(t, affinity, exclude=frozenset({holder.name}))
    warmer = Warmer(t, None, rate=10, registry=None, pool=True)  # type: ignore[arg-type]
    target = warmer.target(CHAT, body)
    assert target is not None and target.name == heir != holder.name
    if heirs_busy:
        for name in NAMES:
            if name != holder.name:
                t.nodes[name].status = agent_status(name, mode="pool", serving=True, queued=3)
        assert warmer.target(CHAT, body) is None, "never add to a queue"


def test_a_pool_sheds_by_queue_only_when_every_serving_node_is_saturated() -> None:
    from ha_agent.gateway.admission.shedding import Shedder

    t = pool()
    shedder = Shedder(t, queue_bound=4, retry_after=2, pool=True)
    t.nodes["sglang-01"].status = agent_status("sglang-01", mode="pool", serving=True, queued=9)
    assert shedder.check() is None, "two nodes have room: routing goes around the full one"
    for name in NAMES:
        t.nodes[name].status = agent_status(name, mode="pool", serving=True, queued=5)
    shed = shedder.check()
    assert shed is not None and shed.status == 429 and shed.headers == {"Retry-After": "2"}
    # A pair's shedder reads the primary alone (the coordinator's queue in a pool).
    assert Shedder(t, queue_bound=4, retry_after=2).check() is not None


def test_a_pool_admission_judges_every_serving_node(tmp_path: Path) -> None:
    from ha_agent.events import EventLog
    from ha_agent.gateway.admission.gate import Admission, RelayParts
    from ha_agent.gateway.metrics import RelayMetrics
    from ha_agent.gateway.upstream.transport import Transport

    t = pool(shed_queue_bound=4)
    events = EventLog(str(tmp_path / "ha.log"), "relay")
    adm = Admission(RelayParts(t.s, t, Transport(0.5, 60), RelayMetrics(), events))
    assert {n.name for n in adm.wait.candidates(t)} == set(NAMES)
    # The coordinator's queue alone is no reason to refuse in a pool.
    t.nodes["sglang-01"].status = agent_status("sglang-01", mode="pool", serving=True, queued=9)
    assert adm.shedder.check() is None
