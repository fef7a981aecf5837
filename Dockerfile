# The sglang-ha node image: an inference engine and its HA agent under supervisord.
#
# GPU hosts (default): the official SGLang image, pinned. CUDA 12 drivers need a
# -cu129 tag; hosts with CUDA 13 drivers can use e.g. lmsysorg/sglang:v0.5.23.
# CPU demo and tests:  --build-arg BASE_IMAGE=debian:bookworm-slim and ENGINE=simulator.
# CI proves the GPU variant on CPU with BASE_IMAGE=sglang-ha/sglang-standin (a stand-in
# with the official image's layout: images/sglang-standin).
#
# Two Pythons, kept apart: the engine runs in the base image's system Python
# (ENGINE_PYTHON, `python3 -m sglang.launch_server`); the agent lives in its own venv
# (/opt/sglang-ha), called by absolute path and last on PATH, so it never shadows
# the engine's python3.
#
# pip inside the build may need a CA bundle (TLS-inspecting proxies, this project's
# CI): pass it as the BuildKit secret `pip_ca`; nothing of it stays in a layer.
ARG BASE_IMAGE=lmsysorg/sglang:v0.5.19-cu129
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# The engine's interpreter, as found in the base image before anything is installed.
ARG ENGINE_PYTHON=/usr/bin/python3
# Python (and venv) only where the base has none: on the official image apt's python3
# package could re-point /usr/bin/python3 away from the Python SGLang is installed in.
# setpriv (util-linux) drops root after the entrypoint has prepared the cache folder.
RUN pkgs="ca-certificates tini procps util-linux" \
 && if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then pkgs="$pkgs python3 python3-venv"; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends $pkgs \
 && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/sglang-ha/
COPY ha_agent /src/sglang-ha/ha_agent
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
 && python3 -m venv /opt/sglang-ha \
 && /opt/sglang-ha/bin/pip install --no-cache-dir --disable-pip-version-check "/src/sglang-ha[gpu]" \
 && rm -rf /src/sglang-ha

COPY images/node/ /etc/sglang-ha/
# uid 1000 is `ubuntu` on Ubuntu 24.04 based images: then sglang gets another uid.
# The entrypoint chowns by name, so the uid never matters.
RUN chmod 0755 /etc/sglang-ha/*.sh \
 && (getent passwd sglang >/dev/null || useradd --uid 1000 --create-home --shell /usr/sbin/nologin sglang 2>/dev/null \
     || useradd --create-home --shell /usr/sbin/nologin sglang) \
 && mkdir -p /var/log/sglang /run/sglang-ha /data/huggingface /var/lib/sglang-ha/arbiter \
 && chown -R sglang:sglang /var/log/sglang /run/sglang-ha /data /var/lib/sglang-ha \
 && if "${ENGINE_PYTHON}" -c 'import sglang' 2>/dev/null; then \
      echo "engine: $("${ENGINE_PYTHON}" -c 'import sglang; print(sglang.__version__)') in ${ENGINE_PYTHON}"; \
    else echo "note: no sglang in ${ENGINE_PYTHON}: this image can run ENGINE=simulator or external only"; fi

ENV PATH=$PATH:/opt/sglang-ha/bin \
    ENGINE=sglang \
    ENGINE_PYTHON=${ENGINE_PYTHON} \
    ENGINE_PORT=30000 \
    HA_API_PORT=8008 \
    HA_ENGINE_URL=http://127.0.0.1:30000 \
    HA_SUPERVISOR_SOCKET=/run/sglang-ha/supervisor.sock \
    HF_HOME=/data/huggingface \
    PYTHONUNBUFFERED=1

# Only the internal network should reach these: compose publishes neither.
EXPOSE 30000 8008
# Runs as sglang. The GPU stack starts it as root (user: "0") so the entrypoint can
# make a bind-mounted model cache writable, then drop to sglang (entrypoint.sh).
USER sglang
WORKDIR /data
ENTRYPOINT ["/usr/bin/tini", "--", "/etc/sglang-ha/entrypoint.sh"]
