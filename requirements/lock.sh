#!/usr/bin/env bash
# Regenerate the hashed locks from pyproject.toml with pip-tools' pip-compile:
#   ci.txt    the extras dev, export, lean and report: what the README and .ci/run install and test
#   lean.txt  the daemon with the lean TensorRT runtime: what deploy/README.md installs on the server
# Run it after changing a requirement in pyproject.toml (tests/test_release.py fails until then).
# pip-compile keeps every pin that still satisfies pyproject.toml; to move pins, pass
# --upgrade or --upgrade-package NAME (applied to ci.txt; lean.txt then follows ci.txt's pins, so
# the server runs the versions CI tested). pip-compile resolves through pip and its configuration:
# PyPI, and on this project's machines the CPU build of torch 2.13.0 from a file on local disk,
# which is why ci.txt pins torch==2.13.0+cpu with that file's hash.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${PIP_TOOLS_VENV:-/tmp/tradingd-pip-tools}
if [ ! -x "$tools/bin/pip-compile" ]; then
    python3 -m venv "$tools" && "$tools/bin/pip" install 'pip-tools==7.6.2'
fi
flags=(--generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links)

"$tools/bin/pip-compile" "${flags[@]}" "$@" --extra=dev --extra=export --extra=lean --extra=report \
    --output-file=requirements/ci.txt pyproject.toml
cp requirements/ci.txt requirements/lean.txt
"$tools/bin/pip-compile" "${flags[@]}" --extra=lean --output-file=requirements/lean.txt pyproject.toml
