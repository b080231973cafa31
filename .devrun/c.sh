source .devrun/env.sh
echo "start $(date +%T)"
timeout 330 python3 -m bench.train_throughput --cases stage3 --checkpointing on --out $OUT > $OUT/train_throughput.log 2>&1; echo "tt rc=$? $(date +%T)"
grep -v -i "warn" $OUT/train_throughput.log | grep -v "^\s*$" | tail -14
save_autotune
