# Prepares a shell on an air-gapped GPU node whose image has torch and Triton (source it, do not run it):
#   source infra/gpu_env.sh [WHEELHOUSE=.whl] [SITE=/tmp/site]
# Installs the wheelhouse built by infra/wheelhouse.sh into SITE, unpacks fla's pre-tuned autotuning results
# (infra/autotune) into Triton's cache, and exports what our GPU processes need:
#   NCCL_NVLS_ENABLE=0 etc.       NVLink multicast off (several GPUs of one host; see README)
#   INFINITEVL_LIFT_FLA_HOPPER_GUARD=1   fla's Hopper guard lifted after its gradient check passes
#   TRITON_CACHE_AUTOTUNING=1     autotuning results kept on disk and reused by every later process
_wheels=${1:-.whl}
_site=${2:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_site" "$_wheels"/*.whl \
  || { echo "infra/gpu_env.sh: installing $_wheels into $_site failed" >&2; return 1; }
export PYTHONPATH="$_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export INFINITEVL_LIFT_FLA_HOPPER_GUARD=1 TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
mkdir -p "$TRITON_CACHE_DIR"
for _t in "$(dirname "${BASH_SOURCE[0]}")"/autotune/*.tgz; do
  [ -f "$_t" ] && tar xzf "$_t" -C "$TRITON_CACHE_DIR"
done
unset _wheels _site _t
