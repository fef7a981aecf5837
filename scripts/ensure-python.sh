#!/usr/bin/env bash
# Create the project's virtualenv (tests and tools), installing python3-venv if
# this Debian lacks it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
venv=${1:-.venv}
if [ -x "$venv/bin/python" ]; then exit 0; fi
if ! have python3; then apt_install python3 python3-venv python3-pip; fi
if ! python3 -m venv "$venv" >/dev/null 2>&1; then
  rm -rf "$venv"
  apt_install python3-venv python3-pip
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade pip
