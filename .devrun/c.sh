source .devrun/env.sh
echo "start $(date +%T)"
timeout 270 python3 -m bench.train_throughput --cases stage3 --checkpointing on --out $OUT > $OUT/train_throughput.log 2>&1; echo "tt rc=$? $(date +%T)"
grep -v -i "warn" $OUT/train_throughput.log | grep -v "^\s*$" | tail -14
save_autotune
timeout 175 python3 -m pytest -m gpu -v -p no:cacheprovider -o faulthandler_timeout=150 tests/test_model_hybrid.py tests/test_teacher_logits_gpu.py tests/test_model_mixers.py > $OUT/gputests_c.log 2>&1; echo "tests rc=$? $(date +%T)"
grep -E "PASS|FAIL|ERROR|Timeout|File .*model/|File .*fla/" $OUT/gputests_c.log | head -40
save_autotune
