source .devrun/env.sh
nvidia-smi -L > $OUT/gpu.txt
echo "start $(date +%T)"
timeout 470 python3 -m bench.train_throughput --out $OUT > $OUT/train_throughput.log 2>&1; echo "tt rc=$? $(date +%T)"
grep -v -i "warn" $OUT/train_throughput.log | tail -60
timeout 95 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_inference_cuda_graphs.py tests/test_model_swa.py > $OUT/gputests_a.log 2>&1; echo "tests rc=$? $(date +%T)"
tail -30 $OUT/gputests_a.log
save_autotune
