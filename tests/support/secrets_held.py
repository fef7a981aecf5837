"""Which of the stack's secrets a container holds, and where: the single-host and the
multi-host least-privilege tests ask the same question of their containers."""

from __future__ import annotations

from docker.models.containers import Container


def distinct_secret_values(secrets: dict[str, str]) -> dict[str, str]:
    """The generated secrets (`make secrets`) by name; each job has a value of its own."""
    values = {k: v for k, v in secrets.items() if len(v) >= 16}
    assert len(set(values.values())) == len(values), "two secrets share a value"
    return values


def secrets_held(c: Container, values: dict[str, str]) -> tuple[set[str], list[str]]:
    """(names whose value is in the container's /run/secrets files, names whose value
    shows in its environment or `docker inspect`)."""
    c.reload()
    config_env = "\n".join(c.attrs["Config"]["Env"] or [])
    code, env = c.exec_run(["env"])
    assert code == 0, env
    code, files = c.exec_run(["sh", "-c", "cat /run/secrets/* 2>/dev/null; true"])
    held = {name for name, value in values.items() if value.encode() in files}
    leaked = [
        f"{name} in {where}"
        for name, value in values.items()
        for where, text in (("docker inspect", config_env.encode()), ("environment", env))
        if value.encode() in text
    ]
    return held, leaked
