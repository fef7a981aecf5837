"""All settings of every sglang-ha component, in one typed place.

Each component reads one class below. Values come from defaults, then from the
environment (``HA_*`` for the agent and relay, ``SIM_*`` for the simulator), then
from command-line overrides. ``python -m ha_agent.<component> --validate-config``
prints the effective settings and any timing warning, then exits.

Timing invariants (lease TTL vs loop and retry) are checked here and only here.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import logging
import os
import ssl
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ha_agent.tls import client_context

log = logging.getLogger(__name__)

FailbackPolicy = Literal["never", "negotiated", "preferred"]


class HaMode(str, enum.Enum):
    """How the nodes share the work (HA_MODE, read by the agents and the relay alike).

    pair: one primary (the lease holder) serves, the others stand by.
    pool: every node whose engine is healthy serves; the lease holder only
        coordinates (docs/architecture.md, "Pool mode").
    """

    PAIR = "pair"
    POOL = "pool"


class ModeSettings(BaseSettings):
    """The one setting the agents and the relay must agree on."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    mode: HaMode = Field(
        HaMode.PAIR,
        description="pair (one primary serves, the others stand by) | pool (every"
        " healthy node serves); the same value on every agent and the relay.",
    )


class TimingWarning(UserWarning):
    """A timing setting was adjusted to keep the lease safe."""


# Secrets as files (compose `secrets:`), never environment: with HA_SECRETS_DIR set
# (/run/secrets in the stacks), a file there named like the variable, lower case
# (ha_redis_password, ha_admin_token, sim_admin_token...), gives that setting.
# Read once at import: the containers set it before any process starts.
_SECRETS_DIR = os.environ.get("HA_SECRETS_DIR") or None


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class LoggingSettings(BaseSettings):
    """Process logging of the agent and the relay."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of the agent's and relay's own log (not the HA log)."
    )


class RedisSettings(BaseSettings):
    """How to reach the coordination store: Redis through Sentinel."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore", secrets_dir=_SECRETS_DIR)

    cluster: str = Field(
        "sglang-ha", description="Name of this HA cluster; prefixes every Redis key."
    )
    sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sentinel-1:26379", "sentinel-2:26379", "sentinel-3:26379"],
        description="Sentinel addresses, host:port, comma separated.",
    )
    sentinel_master: str = Field("sglang-ha", description="Master name the Sentinels monitor.")
    redis_url: str | None = Field(
        None, description="Direct redis:// URL instead of Sentinel (single Redis, tests)."
    )
    redis_username: str | None = Field(None, description="Redis ACL user (default user if unset).")
    redis_password: SecretStr | None = Field(None, description="Redis password (requirepass/ACL).")
    sentinel_password: SecretStr | None = Field(
        None, description="Password of the Sentinels themselves, if they require one."
    )
    redis_timeout: float = Field(0.5, gt=0, description="Socket timeout of one Redis command, s.")

    @field_validator("sentinels", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        out = []
        for item in self.sentinels:
            host, _, port = item.rpartition(":")
            out.append((host or item, int(port) if host else 26379))
        return out


# Marks a setting that `sglang-ha edit-config` can change cluster-wide at run time
# (DynamicConfig below); docs/configuration.md lists them.
DYNAMIC: dict[str, Any] = {"dynamic": True}


class LeaseTiming(BaseSettings):
    """Lease timing, after Patroni: loop_wait + 2 * retry_timeout <= ttl.

    The defaults let a standby take over within about 3 s of the primary's death:
    the lease lives 2.5 s after its last renewal, the standby looks every 0.5 s.
    """

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    lease_ttl: float = Field(
        2.5, gt=0, description="Leader lease time-to-live, s.", json_schema_extra=DYNAMIC
    )
    loop_wait: float = Field(
        0.5, gt=0, description="Pause between two HA cycles, s.", json_schema_extra=DYNAMIC
    )
    retry_timeout: float = Field(
        0.75,
        gt=0,
        description="How long one DCS operation may retry, s.",
        json_schema_extra=DYNAMIC,
    )
    safety_margin: float = Field(
        0.5,
        ge=0,
        description="A primary fences itself this long before its lease could expire, s.",
        json_schema_extra=DYNAMIC,
    )

    # The two timing rules, stated once: the validator below lowers a value that
    # breaks one (environment), `rules_broken` names them (dynamic config refuses).

    def _renew_budget(self) -> float:
        """One cycle plus two full store retries: what a renewal may take."""
        return self.loop_wait + 2 * self.retry_timeout

    def _retry_rule_broken(self) -> bool:
        # Why: a primary must get two full retries in before its lease can lapse,
        # otherwise one slow Redis answer makes it lose the lease while healthy.
        return self._renew_budget() > self.lease_ttl

    def _margin_rule_broken(self) -> bool:
        # Why: a primary that fences itself before its next cycle never renews.
        return self.safety_margin >= self.lease_ttl - self.loop_wait

    @model_validator(mode="after")
    def _patroni_rule(self) -> LeaseTiming:
        if self._retry_rule_broken():
            new_retry = max((self.lease_ttl - self.loop_wait) / 2, 0.05)
            warnings.warn(
                f"loop_wait + 2*retry_timeout = {self._renew_budget():g}s exceeds"
                f" lease_ttl = {self.lease_ttl:g}s;"
                f" retry_timeout lowered from {self.retry_timeout:g}s to {new_retry:g}s",
                TimingWarning,
                stacklevel=2,
            )
            self.retry_timeout = new_retry
        if self._margin_rule_broken():
            new_margin = max((self.lease_ttl - self.loop_wait) / 2, 0.0)
            warnings.warn(
                f"safety_margin {self.safety_margin:g}s leaves no time to renew;"
                f" lowered to {new_margin:g}s",
                TimingWarning,
                stacklevel=2,
            )
            self.safety_margin = new_margin
        return self

    def rules_broken(self) -> list[str]:
        """The lease-timing rules these values break (empty: none), as sentences."""
        broken = []
        if self._retry_rule_broken():
            broken.append(
                f"loop_wait + 2*retry_timeout <= lease_ttl: {self.loop_wait:g} +"
                f" 2*{self.retry_timeout:g} = {self._renew_budget():g}s exceeds"
                f" lease_ttl {self.lease_ttl:g}s"
            )
        if self._margin_rule_broken():
            broken.append(
                f"safety_margin < lease_ttl - loop_wait: {self.safety_margin:g}s leaves no"
                f" time to renew a {self.lease_ttl:g}s lease every {self.loop_wait:g}s"
            )
        return broken

    # Derived timings: named once here, so no caller redoes the arithmetic.

    def lease_deadline(self, started: float) -> float:
        """Until when a lease written at `started` (before the write was sent) is
        surely ours: its TTL less the margin at which a primary fences itself."""
        return started + self.lease_ttl - self.safety_margin

    @property
    def handover_wait(self) -> float:
        """How long a switchover or forced failover waits to see the new leader:
        a few lease lifetimes, never under 10 s."""
        return max(4 * self.lease_ttl, 10.0)

    @property
    def registration_fresh(self) -> float:
        """How recently a member must have registered to count as a live candidate:
        two cycles' registrations, each with its full store retries, plus a second
        of slack for the clocks of two nodes (`Member.updated` is the writer's)."""
        return 2 * self.loop_wait + 2 * self.retry_timeout + 1.0

    @property
    def liveness_limit(self) -> float:
        """The longest an HA cycle may be overdue before /liveness fails: three
        cycles plus one cycle's two store retries, so one slow store is no hang."""
        return 3 * self.loop_wait + 2 * self.retry_timeout

    @property
    def handover_follow_timeout(self) -> float:
        """How long the CLI follows a switchover: the agent's own wait plus 10 s for
        the CLI's polls and the new primary's first status."""
        return self.handover_wait + 10.0

    @property
    def config_apply_wait(self) -> float:
        """How long the CLI waits to see every agent apply a dynamic config: ten
        cycles (each agent reads the store once a cycle), never under 5 s."""
        return max(5.0, 10 * self.loop_wait)

    @property
    def operator_retry_timeout(self) -> float:
        """How long one store read of the CLI may retry: the agents' retry_timeout,
        at least 2 s, since an operator would rather wait than read nothing."""
        return max(self.retry_timeout, 2.0)

    @property
    def handover_grace(self) -> float:
        """After handing the lease over, a former primary waits this long for the
        target before it may compete for the lease again."""
        return 2 * self.lease_ttl

    switchover_ttl: ClassVar[float] = 30.0
    """How long a switchover request stays in the store before it lapses, s."""


class EngineHealthSettings(BaseSettings):
    """How the agent judges its engine without piling probes onto it."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    engine_url: str = Field(
        "http://127.0.0.1:30000", description="The engine as the agent reaches it."
    )
    scrape_interval: float = Field(0.25, gt=0, description="How often /metrics is read, s.")
    scrape_timeout: float = Field(1.0, gt=0, description="Timeout of one /metrics read, s.")
    unresponsive_after: int = Field(
        2,
        ge=1,
        description="Consecutive unanswered reads, its process using no CPU (or out of"
        " sight), before the engine counts as frozen.",
    )
    busy_unresponsive_limit: float = Field(
        30.0,
        gt=0,
        description="An engine whose /metrics go unanswered while its process keeps using"
        " CPU (SGLang tokenizes big prompts in its HTTP process), or that is healthy but"
        " shows no progress at all, counts as hung after this long, s.",
    )
    stall_timeout: float = Field(
        0.5,
        gt=0,
        description="Requests present but no token reaching clients for this long: send a"
        " canary, s.",
    )
    canary_idle: float = Field(
        5.0, gt=0, description="Send a canary generation after this long without real progress, s."
    )
    canary_timeout: float = Field(
        1.0,
        gt=0,
        description="A canary that takes longer counts as failed, unless the engine"
        " delivered tokens or prefilled meanwhile, or may still be in one forward pass, s.",
    )
    prefill_rate: float = Field(
        4000.0,
        gt=0,
        description="Prompt tokens per second the engine prefills at least (a floor: the"
        " monitor raises it to what the engine's counters prove). With the longest forward"
        " it bounds how long one forward pass may run silent, tokens/s.",
    )
    min_forward_allowance: float = Field(
        1.0,
        gt=0,
        description="The shortest silence (requests present, a canary waiting, no counter"
        " moving) judged a hang, however short the longest forward at the proven prefill"
        " rate; s.",
    )
    max_forward_tokens: int | None = Field(
        None,
        ge=1,
        description="Most prompt tokens one forward pass can hold; unset = read from the"
        " engine's /server_info (chunked_prefill_size, or with chunking off the longest"
        " prompt it accepts), 8192 until then.",
    )
    canary_failures: int = Field(
        1, ge=1, description="Failed canaries in a row before the engine is hung."
    )
    startup_grace: float = Field(
        900.0,
        gt=0,
        description="How long an engine may stay 'starting' (model loading) before it is dead, s.",
    )
    supervisor_socket: str | None = Field(
        "/run/sglang-ha/supervisor.sock",
        description="supervisord's socket, to tell a crash from an OOM kill; unset as a sidecar.",
    )
    engine_program: str = Field("engine", description="supervisord program name of the engine.")
    # Sidecar mode (ENGINE=external): what to watch besides HTTP, at most one of three.
    engine_container: str | None = Field(
        None,
        description="Sidecar: name or id of the engine's container, watched through the"
        " Docker API (crash vs OOM kill).",
    )
    docker_host: str = Field(
        "unix:///var/run/docker.sock",
        description="Docker API for engine_container: unix:// socket, or tcp:// / http://"
        " (a read-only socket proxy).",
    )
    engine_pid: int | None = Field(
        None, gt=0, description="Sidecar: PID of the engine process (needs --pid=host)."
    )
    engine_process: str | None = Field(
        None,
        description="Sidecar: find the engine process by this text in its command line"
        " (needs --pid=host), e.g. sglang.launch_server.",
    )
    engine_log: str | None = Field(
        None,
        description="Sidecar with engine_pid/engine_process: the engine's log file, read"
        " for out-of-memory lines and the engine's own exception when it dies.",
    )

    @property
    def hang_detection_time(self) -> float:
        """Worst case from a hung scheduler (requests present, no token) to `hung` when
        no long forward may be in flight (the allowance is at its floor): a canary goes
        out on the first read after the stall, and the silence is judged on the first
        read after the floor, without waiting out the canary's own timeout. Longer by up
        to the forward allowance when a long forward may be in flight."""
        sent = self.stall_timeout + self.scrape_interval
        return max(sent, self.min_forward_allowance) + self.scrape_interval

    @property
    def frozen_detection_time(self) -> float:
        """Worst case from an unanswering engine that uses no CPU to `hung`."""
        return self.unresponsive_after * (self.scrape_timeout + self.scrape_interval)

    @model_validator(mode="after")
    def _busy_outlasts_quick_verdicts(self) -> EngineHealthSettings:
        # Why: the busy bound is the slow path; were it shorter than the quick verdicts
        # it would turn every slow read into a hang and undo the distinction.
        floor = max(self.hang_detection_time, self.frozen_detection_time)
        if self.busy_unresponsive_limit < floor:
            warnings.warn(
                f"busy_unresponsive_limit {self.busy_unresponsive_limit:g}s is shorter than"
                f" the quick hang verdicts ({floor:g}s); raised to {floor:g}s",
                TimingWarning,
                stacklevel=2,
            )
            self.busy_unresponsive_limit = floor
        return self

    @model_validator(mode="after")
    def _one_watch(self) -> EngineHealthSettings:
        chosen = [
            name
            for name in ("engine_container", "engine_pid", "engine_process")
            if getattr(self, name)
        ]
        if len(chosen) > 1:
            raise ValueError(f"set at most one of {', '.join(chosen)}")
        return self


class EngineAuthSettings(BaseSettings):
    """SGLang's --api-key, which the agent and the relay present to the engines.

    SGLang checks it on every route but /health* and /metrics
    (python/sglang/srt/utils/auth.py), so canary, abort, relayed and warming
    requests all carry ``Authorization: Bearer <key>``. Prefer the _file form (a
    compose secret): the key then never appears in the container's environment.
    """

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    engine_api_key: SecretStr | None = Field(
        None, description="The engines' API key (SGLang --api-key); prefer engine_api_key_file."
    )
    engine_api_key_file: str | None = Field(
        None, description="File holding the engines' API key (e.g. /run/secrets/engine_api_key)."
    )
    engine_admin_api_key: SecretStr | None = Field(
        None,
        description="The engines' admin key (SGLang --admin-api-key), presented on"
        " /abort_request (canary and client aborts); prefer engine_admin_api_key_file.",
    )
    engine_admin_api_key_file: str | None = Field(
        None, description="File holding the engines' admin key (SGLang --admin-api-key)."
    )

    @model_validator(mode="after")
    def _key_from_file(self) -> EngineAuthSettings:
        for name in ("engine_api_key", "engine_admin_api_key"):
            path = getattr(self, f"{name}_file")
            if not path:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"set {name} or {name}_file, not both")
            try:
                key = Path(path).read_text().strip()
            except OSError as exc:
                raise ValueError(f"{name}_file: {exc}") from exc
            if not key:
                raise ValueError(f"{name}_file {path} is empty")
            setattr(self, name, SecretStr(key))
        return self

    def engine_headers(self) -> dict[str, str]:
        """Headers every request to an engine carries (empty without a key)."""
        if self.engine_api_key is None:
            return {}
        return {"Authorization": f"Bearer {self.engine_api_key.get_secret_value()}"}

    def engine_admin_headers(self) -> dict[str, str]:
        """Headers of an admin route (/abort_request): with --admin-api-key set SGLang
        accepts only that key there (`decide_request_auth`, python/sglang/srt/utils/
        auth.py, ADMIN_OPTIONAL), else the API key as everywhere."""
        if self.engine_admin_api_key is None:
            return self.engine_headers()
        return {"Authorization": f"Bearer {self.engine_admin_api_key.get_secret_value()}"}


class EngineConnectionSettings(BaseSettings):
    """How the agent and the relay keep idle connections to an engine."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    engine_keepalive_timeout: float = Field(
        4.0,
        gt=0,
        description="An idle pooled connection to an engine is closed after this, s. Keep it"
        " below the engine server's own idle timeout (SGLang's uvicorn closes a connection"
        " SGLANG_TIMEOUT_KEEP_ALIVE, 5 s, after its last response), so that no request goes"
        " out on a connection the engine is closing at that instant.",
    )


class EngineTLSSettings(BaseSettings):
    """How the agent and the relay verify an engine that serves TLS (SGLang's
    --ssl-certfile): every ``https://`` engine URL is reached with `engine_ssl_context`,
    which checks the certificate and its name; there is no setting to skip that."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    engine_tls_ca_file: str | None = Field(
        None,
        description="CA certificate(s) that sign the engines' TLS certificates (the"
        " stack's: /run/secrets/tls_ca.crt); https engine URLs are verified against it"
        " alone. Unset: the system's CAs.",
    )

    _engine_ssl: ssl.SSLContext | None = PrivateAttr(None)

    @field_validator("engine_tls_ca_file", mode="before")
    @classmethod
    def _blank_ca_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _ca_loads(self) -> EngineTLSSettings:
        # At start, with the file named, not at the first request to an engine.
        self.engine_ssl_context()
        return self

    def engine_ssl_context(self) -> ssl.SSLContext:
        """The client context for every https engine URL (ha_agent/tls.py)."""
        cached = self._engine_ssl
        if cached is None:
            try:
                cached = client_context(self.engine_tls_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"engine_tls_ca_file {self.engine_tls_ca_file}: {exc}") from exc
            self._engine_ssl = cached
        return cached


class FailbackSettings(BaseSettings):
    """What happens when a node that failed is healthy again.

    never (default): it rejoins as standby and stays there.
    negotiated: it waits `failback_settle`, then asks the primary, which agrees only
        if it is itself degraded, and hands over by planned switchover after
        `failback_grace`.
    preferred: the primary hands back to the preferred node (HA_PREFERRED_NODE, else
        the highest priority) once it has been healthy for `failback_stable`.
    """

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    failback: FailbackPolicy = Field(
        "never", description="never | negotiated | preferred.", json_schema_extra=DYNAMIC
    )
    priority: int = Field(0, description="Preference for failback=preferred (higher wins).")
    preferred_node: str | None = Field(None, description="The node failback=preferred returns to.")
    failback_settle: float = Field(
        15.0, ge=0, description="Quiet period before negotiating, s.", json_schema_extra=DYNAMIC
    )
    failback_grace: float = Field(
        30.0, ge=0, description="Grace before a granted hand-back, s.", json_schema_extra=DYNAMIC
    )
    failback_stable: float = Field(
        60.0,
        ge=0,
        description="Healthy this long before a preferred node gets the lease back, s.",
        json_schema_extra=DYNAMIC,
    )
    preferred_check_interval: float = Field(
        5.0,
        gt=0,
        description="How often a primary asks the preferred node (failback=preferred)"
        " whether it is ready to take the role back, s.",
    )
    degraded_queue: int = Field(
        32, ge=1, description="Queued requests that make a primary degraded."
    )
    degraded_success_rate: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Below this share of successful canaries (last 2 min) a primary is degraded.",
    )
    degraded_token_usage: float = Field(
        0.95, ge=0, le=1, description="KV-cache usage above which a primary is degraded."
    )


class EngineRestartSettings(BaseSettings):
    """Restarting a hung engine without an operator, once another node serves.

    A hung engine never comes back by itself (SGLang's own watchdog ends it only with
    a batch in flight, after --watchdog-timeout): its agent restarts it through
    supervisord, damped and bounded, so the pair gets its standby back unattended.
    """

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    engine_auto_restart: bool = Field(
        True,
        description="Restart this node's engine (through supervisord) when it is hung and"
        " another node is the healthy primary; never while this node holds the lease.",
    )
    engine_restart_after: float = Field(
        10.0,
        gt=0,
        description="Hung this long before the first automatic restart; each restart"
        " already made in the window doubles it (damping), s.",
    )
    engine_restart_limit: int = Field(
        3,
        ge=1,
        description="Automatic restarts allowed per engine_restart_window; after that the"
        " engine stays hung for an operator.",
    )
    engine_restart_window: float = Field(
        3600.0, gt=0, description="Window over which automatic restarts are counted, s."
    )
    engine_restart_timeout: float = Field(
        60.0,
        gt=0,
        description="How long supervisord may take to kill the hung engine and start a new one, s.",
    )


class PoolSettings(BaseSettings):
    """Pool mode on the agent: when a node that was taken out of service serves again."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    pool_rejoin_stable: float = Field(
        5.0,
        ge=0,
        description="Pool mode: a node taken out of service serves again only once its"
        " engine has been healthy this long and flap damping no longer holds it back, s.",
    )


class AgentSettings(
    ModeSettings,
    PoolSettings,
    RedisSettings,
    LeaseTiming,
    EngineHealthSettings,
    FailbackSettings,
    EngineAuthSettings,
    EngineConnectionSettings,
    EngineTLSSettings,
    EngineRestartSettings,
):
    """The node agent: one per GPU host, next to its engine."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore", secrets_dir=_SECRETS_DIR)

    node_name: str = Field("sglang-01", description="This node's name, unique in the cluster.")
    advertise_engine_url: str | None = Field(
        None, description="Engine URL the relay should use (defaults to http://<hostname>:30000)."
    )
    advertise_api_url: str | None = Field(
        None,
        description="Agent API URL peers and the relay should use (defaults to http://<hostname>:8008).",
    )
    api_host: str = Field("0.0.0.0", description="Agent API bind address.")
    api_port: int = Field(8008, description="Agent API port.")
    admin_token: SecretStr | None = Field(None, description="Shared token for admin endpoints.")
    peers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Agent API URLs of the other nodes (used when Redis is away); comma separated.",
    )
    ha_log: str = Field("/var/log/sglang/ha.log", description="Human HA event log.")
    registry_ttl: float = Field(
        10.0, gt=0, description="TTL of this node's entry in the registry, s."
    )
    arbiter_file: str | None = Field(
        None,
        description="Single-host only: a lock file on a volume both nodes share; lets the"
        " nodes fail over while Redis is away (see ha_agent/node/arbiter.py).",
    )
    relay_admin_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="The relays' admin URLs (their /metrics), comma separated: `sglang-ha"
        " status` shows each node's share of the requests they routed. Empty: no share.",
    )

    @field_validator("peers", "relay_admin_urls", mode="before")
    @classmethod
    def _csv_peers(cls, value: object) -> object:
        return _split_csv(value)


class ClientKeyLimit(BaseModel):
    """One client key's limits (0: none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(0.0, ge=0, description="Requests per second the key may start.")
    burst: int = Field(0, ge=0, description="Requests above the rate at once (0: the rate).")
    concurrency: int = Field(0, ge=0, description="Requests in flight at once.")


class ClientAuthSettings(BaseSettings):
    """Client keys at the gateway: SGLang's --api-key, for the gateway's clients.

    A file of ``name:key`` lines (a compose secret, re-read when it changes); the
    relay checks ``Authorization: Bearer <key>`` as SGLang does
    (python/sglang/srt/utils/auth.py ``decide_request_auth``) and knows the client
    by the key's name. On by default as soon as the gateway is published beyond
    loopback: a LAN address must never open the GPUs to anyone who reaches it.
    """

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore")

    # The one fact both edge defaults hang on (keys here, TLS in EdgeTlsSettings): read
    # from the same GATEWAY_BIND, so keys and TLS can never disagree on where it is.
    gateway_bind: str = Field(
        "127.0.0.1",
        validation_alias=AliasChoices("gateway_bind", "GATEWAY_BIND", "HA_GATEWAY_BIND"),
        description="The host address the gateway's port is published on (env"
        " GATEWAY_BIND, as EdgeTlsSettings reads it); client_auth=auto turns keys on"
        " beyond loopback.",
    )
    client_auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Client keys at the gateway: auto is on unless gateway_bind is loopback.",
    )
    client_keys_file: Path = Field(
        Path("/run/secrets/client_keys"),
        description="The client keys, one name:key a line (make secrets); re-read on change.",
    )
    client_keys_poll: float = Field(
        1.0, gt=0, description="How often the key file is looked at for a change, s."
    )
    client_key_rate: float = Field(
        0.0, ge=0, description="Requests per second each key may start, gateway-wide (0: any)."
    )
    client_key_burst: int = Field(
        0, ge=0, description="Requests a key may start at once above its rate (0: the rate)."
    )
    client_key_concurrency: int = Field(
        0, ge=0, description="Requests each key may have in flight, gateway-wide (0: any)."
    )
    client_key_limits: dict[str, ClientKeyLimit] = Field(
        default_factory=dict,
        description="Per key name, limits in place of the defaults above, JSON"
        ' (\'{"batch": {"rate": 5, "concurrency": 8}}\').',
    )

    @model_validator(mode="after")
    def _keys_when_on(self) -> ClientAuthSettings:
        # No gateway beyond loopback without keys: refused at start, with the way out.
        if self.client_auth_on:
            from ha_agent.gateway.admission.client_keys import KeyFileError, read_keys

            try:
                read_keys(self.client_keys_file)
            except KeyFileError as exc:
                raise ValueError(
                    f"client keys are on (client_auth={self.client_auth}, gateway_bind"
                    f" {self.gateway_bind!r}) but {exc}: run 'make secrets' (it writes"
                    " compose/secrets/client_keys), or set HA_CLIENT_AUTH=off to serve"
                    " anyone who reaches the gateway"
                ) from None
        return self

    @property
    def client_auth_on(self) -> bool:
        if self.client_auth != "auto":
            return self.client_auth == "on"
        return not is_loopback(self.gateway_bind)

    def client_key_limit(self, name: str) -> ClientKeyLimit:
        """The limits of the key called `name`."""
        return self.client_key_limits.get(name) or ClientKeyLimit(
            rate=self.client_key_rate,
            burst=self.client_key_burst,
            concurrency=self.client_key_concurrency,
        )


class EdgeTlsSettings(BaseSettings):
    """TLS at the gateway's edge: Nginx's client listener (docs/security.md, "Edge TLS")."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore")

    tls: Literal["auto", "on", "off"] = Field(
        "auto",
        description="TLS on the client port: auto is on when GATEWAY_BIND reaches beyond"
        " loopback, off on the loopback demo; then plain HTTP to that port is refused.",
    )
    bind: str = Field(
        "127.0.0.1",
        description="Host address the gateway's port is published on (compose passes it"
        " in); decides GATEWAY_TLS=auto.",
    )
    tls_cert: Path = Field(
        Path("/run/secrets/gateway_tls.crt"),
        description="The edge certificate (chain, PEM); `make secrets` makes one signed by"
        " the stack's CA, or put your own there.",
    )
    tls_key: Path = Field(
        Path("/run/secrets/gateway_tls.key"), description="Its private key (PEM)."
    )
    tls_check_interval: float = Field(
        2.0,
        gt=0,
        description="How often the gateway's watchdog looks for a changed certificate or"
        " key on disk (the next TLS handshake gets it, no reload), s.",
    )
    http2: bool = Field(
        True,
        description="Offer HTTP/2 (ALPN h2) on the TLS listener as well as HTTP/1.1"
        " (streams as fast through Nginx: docs/benchmarks.md, Edge TLS).",
    )
    tls_pair_file: Path = Field(
        Path("/run/sglang-ha/edge-tls.pem"),
        description="The gateway's own copy of the key and certificate, checked and"
        " replaced whole, that Nginx reads at each TLS handshake.",
    )

    @property
    def tls_enabled(self) -> bool:
        if self.tls != "auto":
            return self.tls == "on"
        return not is_loopback(self.bind)


def is_loopback(bind: str) -> bool:
    """Is a published address reachable from this host only? (empty, 0.0.0.0 and
    :: publish on every interface)."""
    host = bind.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


class RelaySettings(
    ModeSettings,
    RedisSettings,
    EngineAuthSettings,
    EngineConnectionSettings,
    EngineTLSSettings,
    ClientAuthSettings,
):
    """The leader-aware relay in the gateway."""

    model_config = SettingsConfigDict(env_prefix="HA_", extra="ignore", secrets_dir=_SECRETS_DIR)

    relay_host: str = Field(
        "127.0.0.1", description="Relay data-plane bind address (behind Nginx)."
    )
    relay_port: int = Field(8001, description="Relay data-plane port.")
    relay_admin_port: int = Field(8002, description="Relay status and metrics port (internal).")
    relay_host_admin: str = Field("0.0.0.0", description="Relay admin bind address.")
    relay_workers: int = Field(
        0,
        ge=0,
        description="Relay worker processes sharing the ports (0: the CPUs the gateway"
        " container may use; see ha_agent/gateway/edge/workers.py).",
    )
    nginx_workers: int = Field(
        0,
        ge=0,
        description="Nginx worker processes at the edge (0: one per two relay workers,"
        " rounded up; Nginx's own `auto` counts the host's CPUs, not the container's).",
    )
    relay_worker_index: int = Field(
        0,
        ge=0,
        description="This worker's number (set by supervisord); worker 0 records the"
        " topology's HA events and keeps Nginx's backup list.",
    )
    relay_worker_socket_dir: Path | None = Field(
        None,
        description="Worker i also listens on <dir>/relay-<i>.sock, alone: Nginx reaches"
        " each worker there (a Unix socket costs less per streamed event than loopback"
        " TCP) and can take one out of its rotation (unset: the shared port only).",
    )
    heartbeat_dir: Path | None = Field(
        None,
        description="Each relay worker touches <dir>/<index> while its event loop runs;"
        " the watchdog watches the files (gateway/edge/watchdog.py).",
    )
    heartbeat_interval: float = Field(0.1, gt=0, description="Worker heartbeat period, s.")
    stall_limit: float = Field(
        0.6,
        gt=0,
        description="A worker whose heartbeat is this old is frozen (unless starved of CPU:"
        " HA_STALL_STARVED_LIMIT): taken out of Nginx's rotation until it beats again, s.",
    )
    stall_starved_limit: float | None = Field(
        None,
        gt=0,
        description="A worker with a stale heartbeat that spent at least half of that time"
        " runnable but waiting for a CPU (/proc/<pid>/schedstat) is starved, not frozen,"
        " and stays in Nginx's rotation until its heartbeat is this old; past it, it is"
        " handled as frozen. Unset: three times HA_STALL_LIMIT; at or below"
        " HA_STALL_LIMIT starvation excuses nothing, s.",
    )
    stall_kill_after: float = Field(
        30.0,
        gt=0,
        description="A worker frozen this long is killed (supervisord restarts it); its"
        " requests are lost then, s.",
    )
    access_log: Path = Field(
        Path("/var/log/sglang/access.log"),
        description="Nginx's access log, rotated by the watchdog (gateway/edge/access_log.py).",
    )
    access_log_max_bytes: int = Field(
        64 * 1024 * 1024, ge=4096, description="Rotate the access log past this size, bytes."
    )
    access_log_keep: int = Field(
        4, ge=1, description="Rotated access logs kept (access.log.1 ... .N), the oldest dropped."
    )
    nginx_pid_file: Path = Field(
        Path("/run/sglang-ha/nginx.pid"),
        description="The Nginx master's pid file: told to reopen its logs after a rotation.",
    )
    admin_token: SecretStr | None = Field(None, description="Shared token for admin endpoints.")
    nodes: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Seed nodes name=engine_url=agent_url, comma separated; registry adds more.",
    )
    media_url_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL prefixes media fields may name (else data:/base64 only); comma separated.",
    )
    allow_custom_logit_processor: bool = Field(
        False, description="Let clients send custom_logit_processor (code the engine runs)."
    )
    body_timeout: float = Field(
        60.0,
        gt=0,
        description="A request body must arrive whole within this, s (else 408): as Nginx"
        " took it (X-SGLang-HA-Body-Seconds) and as read by the relay itself.",
    )
    poll_interval: float = Field(0.5, gt=0, description="Leader and agent status poll, s.")
    connect_timeout: float = Field(0.5, gt=0, description="Connect timeout to an engine, s.")
    spare_connections: int = Field(
        2,
        ge=0,
        description="Connected, unused sockets each relay worker keeps to each node in"
        " rotation, so that a stream's connect is off its path (0: connect per stream).",
    )
    spare_max_age: float = Field(
        4.0,
        gt=0,
        description="A spare unused this long is closed and replaced, s. SGLang's server"
        " (uvicorn) closes no connection before its first request; the age is for a proxy"
        " between the relay and the engine that closes idle connections, and stays under"
        " the idle timeout most keep (SGLang's own, SGLANG_TIMEOUT_KEEP_ALIVE, is 5 s).",
    )
    first_byte_timeout: float = Field(
        600.0,
        gt=0,
        description="Upper bound before the first response byte (non-stream generations), s.",
    )
    max_attempts: int = Field(
        6, ge=1, description="Upstream attempts for one request before it fails."
    )
    retry_deadline: float = Field(
        30.0, gt=0, description="Stop re-sending a request this long after it arrived, s."
    )
    warm_rate: float = Field(
        2.0,
        ge=0,
        description="Prefill-only mirrors of live requests to the standby, per s (0: off).",
        json_schema_extra=DYNAMIC,
    )
    warm_max_inflight: int = Field(4, ge=1, description="Mirrors in flight at most.")
    affinity_block_chars: int = Field(
        256,
        gt=0,
        description="Pool mode: prompts are matched to the node that holds their prefix"
        " in blocks of this many characters.",
    )
    affinity_max_chars: int = Field(
        32768,
        gt=0,
        description="Pool mode: only this many leading characters of a prompt count for"
        " prefix affinity.",
    )
    affinity_load_factor: float = Field(
        1.25,
        ge=1.0,
        description="Pool mode: a node takes a request for a prefix it holds only while its"
        " requests in flight stay within this factor of the pool's average (bounded-load"
        " consistent hashing, plus HA_AFFINITY_LOAD_SLACK); past it the request goes to"
        " the next node on the ring within it.",
    )
    affinity_load_slack: int = Field(
        4,
        ge=0,
        description="Pool mode: requests in flight a node may hold above that bound and"
        " still take a prefix it holds (at low load the factor alone would spread"
        " every conversation away from its cache).",
    )
    migration_limit: int = Field(
        3, ge=0, description="How often one stream may move to another node."
    )
    max_sequence_length: int = Field(
        131072, gt=0, description="No migration past this many prompt+generated tokens."
    )
    reasoning_parser: Literal["", "qwen3", "deepseek-r1"] = Field(
        "",
        description="The engines' --reasoning-parser: chat streams that carried"
        " reasoning_content migrate (empty: such streams end with a retryable error).",
    )
    cors_allow_origins: str = Field(
        "*",
        description="CORS origins, comma separated; * as SGLang (always on there); empty: off.",
    )
    cors_allow_credentials: bool = Field(
        True, description="CORS Access-Control-Allow-Credentials, as SGLang (true)."
    )
    # Overload and query-of-death protection (gateway/admission/: limits, shedding, quarantine).
    context_length: int = Field(
        0, ge=0, description="Refuse longer prompts (tokens); 0: the primary's max_model_len."
    )
    prompt_chars_per_token: float = Field(
        10.0, gt=0, description="Characters one token may hold at most (prompt estimate)."
    )
    constraint_max_bytes: int = Field(
        65536, gt=0, description="Largest regex / json_schema / ebnf accepted, bytes."
    )
    constraint_max_depth: int = Field(32, gt=0, description="Deepest json_schema accepted.")
    regex_max_repeat: int = Field(
        100_000, gt=0, description="Largest product of nested regex repeat counts."
    )
    warm_max_chars: int = Field(
        65536, ge=0, description="The warmer never mirrors a longer prompt (characters)."
    )
    shed_queue_bound: int = Field(
        256, ge=0, description="Answer 429 while the primary has this many queued (0: off)."
    )
    shed_retry_after: int = Field(2, ge=1, description="Retry-After sent with a 429, s.")
    shed_wait_bound: float = Field(
        10.0,
        ge=0,
        description="Answer 429 to a generation request whose expected queue wait on the"
        " node it would go to is past this, s (0: off); Retry-After is the time the wait"
        " needs to fall under it, at least HA_SHED_RETRY_AFTER.",
    )
    quarantine_ttl: float = Field(
        600.0, gt=0, description="How long a query of death is refused, s."
    )
    quarantine_suspect_wait: float = Field(
        120.0,
        gt=0,
        description="How long a request on an engine that crashed of its own exception"
        " waits to be re-sent alone while fewer than two nodes serve, s; then 503.",
    )
    quarantine_dir: Path | None = Field(
        None,
        description="A folder the gateway's relay workers share quarantined requests"
        " through; unset: each worker keeps its own.",
    )
    ha_log: str = Field("/var/log/sglang/ha.log", description="Human HA event log.")
    nginx_backup_file: str | None = Field(
        None,
        description="If set, the relay keeps Nginx's last-resort upstream list in this file"
        " (the registry's engines, by address) and reloads Nginx when it changes.",
    )
    nginx_reload_command: str = Field("nginx -s reload", description="How to reload Nginx.")
    nginx_client_keys_file: str | None = Field(
        None,
        description="If set and client keys are on, the relay keeps Nginx's copy of the"
        " keys (its map of valid Authorization headers) in this file and reloads Nginx"
        " when the key file changes.",
    )

    @field_validator("nodes", "media_url_allow", mode="before")
    @classmethod
    def _csv_nodes(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("relay_worker_socket_dir", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # set empty: back to the shared TCP port


S = TypeVar("S", bound=BaseSettings)


class DynamicConfig(BaseModel):
    """Cluster-wide settings kept in the store (`sglang-ha edit-config`).

    Each value, when set, overrides the same setting of every agent and of the relay
    (their environment stays the default); unset values leave the environment's.
    Read by every agent each HA cycle and by the relay each refresh, so a change
    applies within a cycle, without restarts. Only what is safe to change live is
    here: the lease timing, the failback policy and its periods, the warming rate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    lease_ttl: float | None = Field(None, gt=0)
    loop_wait: float | None = Field(None, gt=0)
    retry_timeout: float | None = Field(None, gt=0)
    safety_margin: float | None = Field(None, ge=0)
    failback: FailbackPolicy | None = None
    failback_settle: float | None = Field(None, ge=0)
    failback_grace: float | None = Field(None, ge=0)
    failback_stable: float | None = Field(None, ge=0)
    warm_rate: float | None = Field(None, ge=0)

    def values(self) -> dict[str, Any]:
        """Only what is set."""
        return self.model_dump(exclude_none=True)

    def to_json(self) -> str:
        return json.dumps(self.values(), sort_keys=True, separators=(",", ":"))

    def diff(self, new: DynamicConfig) -> list[str]:
        """`key: old -> new` for each value that changes ('-': not set)."""
        old_v, new_v = self.values(), new.values()
        return [
            f"{key}: {old_v.get(key, '-')} -> {new_v.get(key, '-')}"
            for key in type(self).model_fields
            if old_v.get(key) != new_v.get(key)
        ]

    def applied_to(self, settings: S) -> S:
        """`settings` with this config's values in place of its own. Raises ValueError
        (naming the rule) if the result breaks the lease-timing invariant: the
        store's values are refused, never silently adjusted."""
        update = {k: v for k, v in self.values().items() if k in type(settings).model_fields}
        result = settings.model_copy(update=update)
        if isinstance(result, LeaseTiming):
            broken = result.rules_broken()
            if broken:
                raise ValueError("breaks the lease-timing rule " + "; ".join(broken))
        return result


DYNAMIC_SETTINGS: tuple[str, ...] = tuple(DynamicConfig.model_fields)


class SimSettings(BaseSettings):
    """The SGLang-compatible engine simulator (CPU demo and tests only)."""

    model_config = SettingsConfigDict(env_prefix="SIM_", extra="ignore", secrets_dir=_SECRETS_DIR)

    host: str = "0.0.0.0"
    port: int = 30000
    model_name: str = Field(
        "sglang-ha-simulator", description="Served model name; says it is a simulator."
    )
    instance_name: str = Field("", description="Shown in /server_info to tell instances apart.")
    startup_delay: float = Field(
        0.5, ge=0, description="Time 'loading weights' before /health is 200, s."
    )
    ttft_base: float = Field(0.02, ge=0, description="Fixed time to first token, s.")
    prefill_per_token: float = Field(
        0.0002, ge=0, description="Extra TTFT per uncached prompt token, s."
    )
    itl: float = Field(0.01, ge=0, description="Inter-token latency at concurrency 1, s.")
    concurrency_slowdown: float = Field(
        0.01, ge=0, description="ITL grows by this fraction per extra running request."
    )
    max_running_requests: int = Field(256, ge=1, description="More requests wait in the queue.")
    max_queued_requests: int | None = Field(
        None,
        ge=1,
        description="As SGLang's --max-queued-requests: a request that would wait behind"
        " this many is refused with 503 'The request queue is full.'; unset = no limit.",
    )
    chunked_prefill_size: int = Field(
        4096,
        ge=-1,
        description="As SGLang's --chunked-prefill-size (4096: what 0.5.19 resolves when"
        " it finds no GPU memory): tokens per prefill forward; -1 = no chunking.",
    )
    max_total_tokens: int = Field(
        65536, ge=1, description="KV pool size in tokens: admission budget and prefix cache."
    )
    health_check_timeout: float = Field(
        20.0,
        gt=0,
        description="As SGLANG_HEALTH_CHECK_TIMEOUT: /health waits this long for output, s.",
    )
    keep_alive_timeout: float = Field(
        5.0,
        gt=0,
        description="A connection is closed when no request comes this long after its last"
        " response; none before its first request, as uvicorn under SGLang"
        " (SGLANG_TIMEOUT_KEEP_ALIVE, 5 s by default), s.",
    )
    health_check_interval: float = Field(
        1.0, gt=0, description="How often /health looks for output (SGLang: every 1 s), s."
    )
    decode_log_interval: int = Field(
        40, ge=1, description="As SGLang's --decode-log-interval: gauges publish this often."
    )
    page_size: int = Field(16, ge=1, description="Prefix cache granularity in tokens.")
    context_length: int = Field(32768, ge=1, description="Longest prompt + output accepted.")
    eos_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Chance per token of stopping early (deterministic in the seed).",
    )
    admin_token: SecretStr | None = Field(None, description="Token for the /sim/* fault knobs.")
    api_key: SecretStr | None = Field(
        None,
        description="As SGLang's --api-key: Bearer key for all but /health*, /metrics.",
    )
    api_key_file: str | None = Field(None, description="File holding api_key (not argv, env).")
    admin_api_key: SecretStr | None = Field(
        None, description="As SGLang's --admin-api-key: the key for admin (control) routes."
    )
    admin_api_key_file: str | None = Field(None, description="File holding admin_api_key.")
    weight_version: str = Field("default", description="Reported as meta_info.weight_version.")
    enable_cache_report: bool = Field(
        True,
        description="As SGLang's --enable-cache-report: usage.prompt_tokens_details.cached_tokens.",
    )
    disconnect_abort_delay: float = Field(
        2.0, ge=0, description="A request whose client went away is aborted this much later, s."
    )
    drain_timeout: float = Field(
        5.0,
        ge=0,
        description="On SIGINT, running requests may finish this long, s (SIGTERM drains"
        " as SGLang does, with no deadline).",
    )
    sigterm_poll_interval: float = Field(
        5.0,
        gt=0,
        description="How often the SIGTERM drain looks for remaining requests, s (SGLang's"
        " fixed 5 s; lower only in tests).",
    )
    watchdog_timeout: float = Field(
        300.0,
        ge=0,
        description="As SGLang's --watchdog-timeout: a batch in flight with no forward for"
        " this long kills the process (SIGKILL), s; 0 = off.",
    )
    reasoning_parser: Literal["", "qwen3", "deepseek-r1"] = Field(
        "",
        description="As SGLang's --reasoning-parser: chat answers think first and stream"
        " reasoning_content (empty: off, reasoning_content null).",
    )
    tool_call_parser: Literal["", "qwen25", "qwen"] = Field(
        "",
        description="As SGLang's --tool-call-parser: a chat request with tools gets a"
        " tool call, streamed as tool_calls deltas (empty: off, the call stays in the"
        " content).",
    )
    # SGLang's TLS flags (server_args.py, "SSL/TLS"), served as its uvicorn does.
    ssl_keyfile: str | None = Field(None, description="As SGLang's --ssl-keyfile.")
    ssl_certfile: str | None = Field(None, description="As SGLang's --ssl-certfile.")
    ssl_ca_certs: str | None = Field(
        None, description="As SGLang's --ssl-ca-certs (loaded; no client certificate asked)."
    )
    ssl_keyfile_password: SecretStr | None = Field(
        None, description="As SGLang's --ssl-keyfile-password."
    )
    enable_ssl_refresh: bool = Field(
        False,
        description="As SGLang's --enable-ssl-refresh: a changed certificate or key is"
        " served to new connections without a restart.",
    )
    faults: dict[str, object] = Field(
        default_factory=dict,
        description="Fault knobs active from startup, JSON (SIM_FAULTS='{\"hang\": true}').",
    )
    log_level: str = Field("info", description="Log level of the simulator process.")

    @model_validator(mode="after")
    def _chunk_size(self) -> SimSettings:
        if self.chunked_prefill_size == 0:
            raise ValueError("chunked_prefill_size must be positive, or -1 for no chunking")
        return self

    @model_validator(mode="after")
    def _ssl_flags(self) -> SimSettings:
        # SGLang's checks and words (arg_groups/serving_hook.py, handle_ssl_validation).
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile requires --ssl-certfile to be specified as well.")
        if self.ssl_certfile and not self.ssl_keyfile:
            raise ValueError("--ssl-certfile requires --ssl-keyfile to be specified as well.")
        if not self.ssl_certfile and self.ssl_ca_certs:
            raise ValueError(
                "--ssl-ca-certs has no effect without --ssl-certfile and --ssl-keyfile."
            )
        if not self.ssl_certfile and self.ssl_keyfile_password:
            raise ValueError(
                "--ssl-keyfile-password has no effect without --ssl-certfile and --ssl-keyfile."
            )
        for what, flag, path in (
            ("key", "--ssl-keyfile", self.ssl_keyfile),
            ("certificate", "--ssl-certfile", self.ssl_certfile),
            ("CA certificates", "--ssl-ca-certs", self.ssl_ca_certs),
        ):
            if path and not os.path.isfile(path):
                raise ValueError(
                    f"SSL {what} file not found: '{path}'. Please check the {flag} path."
                )
        if self.enable_ssl_refresh and not (self.ssl_certfile and self.ssl_keyfile):
            raise ValueError(
                "--enable-ssl-refresh requires --ssl-certfile and --ssl-keyfile to be specified."
            )
        return self

    @model_validator(mode="after")
    def _keys_from_files(self) -> SimSettings:
        # Keys may come from files (Docker/K8s secrets) so they never need to be in argv.
        for name in ("api_key", "admin_api_key"):
            path = getattr(self, f"{name}_file")
            if path is None:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"set {name} or {name}_file, not both")
            try:
                key = Path(path).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"{name}_file: cannot read {path}: {exc.strerror}") from None
            if not key:
                raise ValueError(f"{name}_file: {path} is empty")
            setattr(self, name, SecretStr(key))
        return self
