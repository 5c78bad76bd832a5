#!/usr/bin/env bash
# Create .venv and install the project with its pinned versions (constraints.txt).
# torch/torchvision come from the package registry (the build that runs on CPU and on GPU); a local
# CPU-only torch wheel offered through PIP_FIND_LINKS would break torchvision (and with it pyiqa and
# diffusers), so find-links is pointed at an empty folder for this install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
empty_links=$(mktemp -d)
export PIP_FIND_LINKS="$empty_links" PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip
# PYTHONWARNINGS: setuptools' editable build prints a multi-line warning block on every run (folders
# named like the package), which says nothing about this project; pip's own errors still show.
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
rmdir "$empty_links"
.venv/bin/python -c "import torch, torchvision, diffusers, ray, faiss, pyiqa; print('setup ok: torch', torch.__version__, 'ray', ray.__version__)"
