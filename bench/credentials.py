"""The engines' API key, as the benchmark's clients present it.

Our stack's engines run with SGLang's --api-key (`make secrets` writes it to
compose/secrets/engine_api_key). The relay and the gateway's Nginx present it
themselves, but the paths that reach an engine without them (direct, "Nginx only"
with the gateway's own config, SGLang's router forwarding the client's header) need
the client to. Every path gets the same header, so the request bytes are the same on
each; the gateway drops a client's Authorization and sends the engines' own.
"""

from __future__ import annotations

from pathlib import Path

KEY_FILE = Path(__file__).resolve().parent.parent / "compose" / "secrets" / "engine_api_key"


def engine_authorization() -> str:
    """`Bearer <key>`, read when asked (`make secrets` may have rotated it)."""
    key = KEY_FILE.read_text().strip()
    if not key:
        raise RuntimeError(f"{KEY_FILE} is empty: run `make secrets`")
    return f"Bearer {key}"


def engine_headers() -> dict[str, str]:
    return {"Authorization": engine_authorization()}


def engine_headers_if_any() -> dict[str, str]:
    """The header when `make secrets` has written a key (every stack `make bench`
    starts); none for engines started without one (bench.relay_local)."""
    return engine_headers() if KEY_FILE.exists() else {}
