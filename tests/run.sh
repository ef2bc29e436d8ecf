#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs hfswarm, its test tools and the real
# Hub clients the tests drive (transformers, datasets, olah) first; as root with apt-get,
# also iproute2 (the simulated-LAN tests use network namespaces) and chromium (the status
# page is rendered headless). Tests that need root, network namespaces or chromium skip
# with a reason when those are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
  fi
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[dev,clients]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
