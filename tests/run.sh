#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs hfswarm and its test tools first.
# Tests that need root or network namespaces skip with a reason when those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
