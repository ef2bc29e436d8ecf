#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs hfswarm, its test tools and the real
# Hub clients the tests drive (transformers, datasets) first.
# Tests that need root or network namespaces skip with a reason when those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev,clients]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
