"""SGLang-compatible engine simulator for the CPU demo stack and the tests (not SGLang).

``create_app(settings)`` returns the aiohttp application; ``python -m ha_agent.sim`` (or
``sglang-ha-sim``) serves it. See docs/simulator.md.
"""

from ha_agent.sim.server import create_app

__all__ = ["create_app"]
