#!/usr/bin/env bash
# Builds an offline wheelhouse for an air-gapped GPU node whose image already has torch and Triton:
# the pure-Python packages our GPU code needs on top of it, for the node's Python and platform.
#   usage: bash infra/wheelhouse.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#   on the node: pip install --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dest"
pkgs=(
  "flash-linear-attention==0.6.0" "fla-core==0.6.0" "einops==0.8.2"
  "transformers==5.24.0"
  "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "pytest-timeout==2.4.0"
  "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2" "pygments==2.21.0"
  "fsspec==2026.9.0" "pyyaml==6.0.4"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${pkgs[@]}"
ls -la "$dest"
