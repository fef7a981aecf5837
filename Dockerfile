# The sglang-ha node image: an inference engine and its HA agent under supervisord.
#
# GPU hosts (default): the official SGLang image, pinned. CUDA 12 drivers need a
# -cu129 tag; hosts with CUDA 13 drivers can use e.g. lmsysorg/sglang:v0.5.23.
# CPU demo and tests:  --build-arg BASE_IMAGE=debian:bookworm-slim and ENGINE=simulator.
#
# pip inside the build may need a CA bundle (TLS-inspecting proxies, this project's
# CI): pass it as the BuildKit secret `pip_ca`; nothing of it stays in a layer.
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.19-cu129
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# python3-venv keeps the agent's dependencies apart from the engine's Python.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates tini procps \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/sglang-ha/
COPY ha_agent /src/sglang-ha/ha_agent
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && python3 -m venv /opt/sglang-ha \
 && /opt/sglang-ha/bin/pip install --no-cache-dir --disable-pip-version-check "/src/sglang-ha[gpu]" \
 && rm -rf /src/sglang-ha

COPY images/node/ /etc/sglang-ha/
RUN chmod 0755 /etc/sglang-ha/*.sh \
 && (getent passwd sglang >/dev/null || useradd --uid 1000 --create-home --shell /usr/sbin/nologin sglang 2>/dev/null \
     || useradd --create-home --shell /usr/sbin/nologin sglang) \
 && mkdir -p /var/log/sglang /run/sglang-ha /data /var/lib/sglang-ha/arbiter \
 && chown -R sglang:sglang /var/log/sglang /run/sglang-ha /data /var/lib/sglang-ha

ENV PATH=/opt/sglang-ha/bin:$PATH \
    ENGINE=sglang \
    ENGINE_PORT=30000 \
    HA_API_PORT=8008 \
    HA_ENGINE_URL=http://127.0.0.1:30000 \
    HA_SUPERVISOR_SOCKET=/run/sglang-ha/supervisor.sock \
    HF_HOME=/data/huggingface \
    PYTHONUNBUFFERED=1

# Only the internal network should reach these: compose publishes neither.
EXPOSE 30000 8008
USER sglang
WORKDIR /data
ENTRYPOINT ["/usr/bin/tini", "--", "/etc/sglang-ha/entrypoint.sh"]
