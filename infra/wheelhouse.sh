#!/usr/bin/env bash
# Builds an offline wheelhouse for an air-gapped GPU node whose image already has torch and Triton:
# the pure-Python packages our GPU code needs on top of it, for the node's Python and platform.
#   usage: bash infra/wheelhouse.sh [DEST=.whl] [PYTHON_VERSION=3.12]
#   on the node: pip install --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
#
# DeepSpeed ships only an sdist: its wheel is built here with DS_BUILD_OPS=0 (pure Python, py3-none-any; any op
# it needs is JIT-built on the node, whose image has nvcc and ninja), by a Python that has torch (PYTHON, default
# .venv/bin/python), at the version that Python has installed. Its runtime needs that the GPU image lacks:
# hjson (einops, msgpack, ninja, numpy, packaging, psutil, py-cpuinfo, tqdm are on the image; pydantic is below).
# peft is carried at our tested version: the image's may predate transformers 5.24.
# WITH_MEDIA=1 adds PyAV and pypdfium2 (40 MB, at the versions PYTHON has) for nodes that read or write videos
# and PDFs: the `sample` corpus (e.g. configs/proof.yaml's long corpus), video eval suites.
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
pkgs=(
  "flash-linear-attention==0.6.0" "fla-core==0.6.0" "einops==0.8.2"
  "transformers==5.24.0" "peft==0.21.2"
  "hjson==3.1.0"
  "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "pytest-timeout==2.4.0"
  "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2" "pygments==2.21.0"
  "fsspec==2026.9.0" "pyyaml==6.0.4"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
if [ "${WITH_MEDIA:-0}" = 1 ]; then
  for name in av pypdfium2; do
    pkgs+=("$name==$("$python" -c "import importlib.metadata as m; print(m.version('$name'))")")
  done
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
  "${platforms[@]}" -d "$dest" "${pkgs[@]}"

ds_version=$("$python" -c "import importlib.metadata as m; print(m.version('deepspeed'))")
rm -f "$dest"/deepspeed-*.whl
DS_BUILD_OPS=0 "$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "deepspeed==$ds_version"
ls "$dest"/deepspeed-"$ds_version"-py3-none-any.whl >/dev/null  # pure Python, or it would not travel
ls -la "$dest"
du -sh "$dest"
