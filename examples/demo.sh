#!/usr/bin/env bash
# The swarm demo, from a fresh machine, with no internet: a local mirror, three agents on
# 127.0.0.2-4, one model moving between them, and a table of bytes from peers vs mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e .
exec hfswarm demo "$@"
