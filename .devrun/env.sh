python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  INFINITEVL_LIFT_FLA_HOPPER_GUARD=1 PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=/tmp/tc \
  TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/tc
for t in infra/autotune/*.tgz .devrun/autotune.tgz; do [ -f $t ] && tar xzf $t -C /tmp/tc; done
save_autotune() { (cd /tmp/tc && find . -name '*.autotune.json' | tar czf $OUT/autotune.tgz -T -); }
