#!/usr/bin/env bash
# Installed size of a serving node (base install) against base + train, from this checkout.
#
# Creates two throwaway virtual environments, installs the checkout into each ("." and ".[train]")
# and prints the size of their site-packages, plus the largest packages of each. Not run in CI: it
# downloads wheels. Torch is installed first from TORCH_PACKAGES (default: the pinned release), so a
# CPU-only torch can be measured too, e.g.
#   TORCH_PACKAGES="torch torchvision" PIP_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     PIP_EXTRA_INDEX_URL=https://pypi.org/simple scripts/installed_size.sh
#
# Usage: scripts/installed_size.sh [PYTHON]   (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-python3}"
torch_packages="${TORCH_PACKAGES:-torch==2.14.1 torchvision==0.29.1}"
work="$(mktemp -d "${TMPDIR:-/tmp}/mammonode-size.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Build from a copy: pip writes build/ and *.egg-info next to the sources, and the checkout is shared.
mkdir "$work/src"
tar -C "$root" --exclude=./.venv --exclude=./.git --exclude=./data --exclude=./runs --exclude=./build \
    --exclude='*.egg-info' --exclude='__pycache__' --exclude='.*_cache' -cf - . | tar -C "$work/src" -xf -

site_packages() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

install() {  # install NAME SPEC...: a fresh venv with the given requirements
  local env="$work/$1"
  shift
  "$python" -m venv "$env"
  "$env/bin/pip" install --quiet --disable-pip-version-check "$@"
}

install base "$work/src"
# shellcheck disable=SC2086  # TORCH_PACKAGES is a list of requirement specifiers
install train $torch_packages
"$work/train/bin/pip" install --quiet --disable-pip-version-check "$work/src[train]"

for name in base train; do
  sp="$(site_packages "$work/$name")"
  echo "== $name: $(du -sm "$sp" | cut -f1) MB in site-packages (pip and setuptools included)"
  echo "   largest:"
  du -sm "$sp"/* | sort -rn | head -8 | while read -r mb path; do printf '   %6s MB  %s\n' "$mb" "${path##*/}"; done
done
echo "torch in base+train: $("$work/train/bin/python" -c 'import torch; print(torch.__version__, "cuda" if torch.version.cuda else "cpu-only")')"
