source infra/gpu_env.sh .whl /tmp/site
export TOKENIZERS_PARALLELISM=false
[ -f .devrun/autotune.tgz ] && tar xzf .devrun/autotune.tgz -C "$TRITON_CACHE_DIR"
save_autotune() { (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf $OUT/autotune.tgz -T -); }
