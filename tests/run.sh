#!/usr/bin/env bash
# Install everything the tests need, then run them: the README's test command, and what CI runs
# (.ci/run calls it in a fresh virtual environment). Extra arguments go to pytest.
#
#   bash tests/run.sh              # the default suite (slow tests deselected)
#   bash tests/run.sh -m slow      # the slow ones
#
# Uses the python3 on PATH (activate a virtual environment first if you want one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU torch wheel first: a bare `torch` requirement would pull several GB of CUDA packages.
# A torch that is already installed (e.g. a CUDA build you chose) is kept.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet -e ".[test]"

# The playground tests drive Debian's Chromium through playwright (playwright's own browser
# download is not used). DIFFPO_CHROMIUM points them at another Chromium binary.
if [ -z "${DIFFPO_CHROMIUM:-}" ] && ! command -v chromium >/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        echo "tests/run.sh: installing Chromium for the playground tests (apt-get install chromium)" >&2
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "tests/run.sh: the playground tests need Chromium: install it, or set DIFFPO_CHROMIUM to a" \
             "Chromium binary, then run this again" >&2
        exit 1
    fi
fi

exec "$PY" -m pytest -q "$@"
