#!/usr/bin/env bash
# A self-contained tour that needs no internet: generate a model, serve it from the
# project's local HF-compatible mirror, download it with hfswarm, and read it back with
# huggingface_hub offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e .
exec python3 examples/quickstart.py "$@"
