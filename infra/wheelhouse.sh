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
# peft is carried at our tested version: the image's may predate transformers 5.25. transformers 5.25 (whose
# assisted decoding tells the cache its draft length) needs huggingface-hub 2.x, which needs httpx2: the image's
# hub is 1.x. transformers 5.25 also declares `kernels` (Hub-downloaded layer kernels; 9 MB installed): it is
# left out, and every loader of ours passes use_kernels=False, without which transformers refuses to load a
# checkpoint where that package is missing.
# WITH_MEDIA=1 adds PyAV and pypdfium2 (40 MB, at the versions PYTHON has) for nodes that read or write videos
# and PDFs: the `sample` corpus (e.g. configs/proof.yaml's long corpus), video eval suites.
# WITH_PREFECT=1 adds Prefect and what it needs that a CUDA PyTorch image lacks (34 MB for Python 3.12; the list was
# resolved for prefect 3.9.1 against such an image's packages), so stages run through the flows on the node:
# `infinitevl run` and `python -m bench.proof --runner flows`. WITH_S3=1 adds s3fs and botocore (14 MB) for s3://
# run roots. A wheelhouse of all three is ~72 MB: more than some transfer limits; carry what the node needs.
set -euo pipefail
dest=${1:-.whl}
pyver=${2:-3.12}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
pkgs=(
  "flash-linear-attention==0.6.0" "fla-core==0.6.0" "einops==0.8.2"
  "transformers==5.25.0" "peft==0.21.2"
  "huggingface-hub==2.4.0" "httpx2==2.17.0" "httpcore2==2.17.0" "truststore==0.10.5"
  "hjson==3.1.0"
  "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "pytest-timeout==2.4.0"
  "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2" "pygments==2.21.0"
  "fsspec==2026.9.0" "pyyaml==6.0.4"
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
)
if [ "${WITH_PREFECT:-0}" = 1 ]; then
  pkgs+=(
    "prefect==3.9.1" "aiosqlite==0.22.1" "alembic==1.20.1" "amplitude-analytics==1.3.0" "apprise==2.0.1"
    "asgi-lifespan==2.1.0" "asyncpg==0.32.0" "beartype==0.23.1" "burner-redis==0.1.7" "cachetools==7.3.3"
    "cffi==2.1.1" "coolname==5.0.0" "cronsim==2.9" "cryptography==51.0.1" "cyclopts==5.5.2" "dateparser==1.5.0"
    "docker==7.2.0" "docstring-parser==0.18.0" "exceptiongroup==1.3.2" "fastapi==0.150.0" "graphviz==0.21"
    "greenlet==3.5.6" "griffe==2.4.1" "griffecli==2.4.1" "griffelib==2.4.1" "h2==4.4.1" "hpack==4.2.0"
    "hyperframe==6.1.0" "jinja2-humanize-extension==0.4.0" "jsonpatch==1.48" "jsonpointer==3.12"
    "jsonschema==4.26.0" "jsonschema-specifications==2025.9.1" "mako==1.4.3" "oauthlib==4.0.1"
    "opentelemetry-api==1.45.3" "orjson==3.13.0" "pendulum==3.3.0" "py-key-value-aio==0.5.0" "pycparser==3.12"
    "pydantic-extra-types==2.11.1" "pydantic-settings==2.16.3" "pydocket==0.27.2" "python-dotenv==1.2.4"
    "python-json-logger==4.2.0" "python-slugify==9.1.3" "pytz==2026.6" "readchar==4.2.2" "redis==8.2.0"
    "referencing==0.37.0" "requests-oauthlib==2.0.0" "rfc3339-validator==0.1.4" "rich-rst==2.2.0"
    "rpds-py==2026.9.1" "ruamel-yaml==0.19.1" "semver==3.2.0" "sniffio==1.3.1" "sqlalchemy==2.1.9"
    "starlette==1.10.0" "text-unidecode==1.3" "toml==0.10.2" "tzdata==2026.6" "tzlocal==5.4.5"
    "uncalled-for==0.6.2" "uvicorn==0.55.0" "websockets==16.1.1" "whenever==0.11.0"
  )
fi
if [ "${WITH_S3:-0}" = 1 ]; then
  pkgs+=("s3fs==2026.9.0" "aiobotocore==3.10.0" "botocore==1.43.117" "aioitertools==0.13.0" "jmespath==1.1.0")
fi
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
