source .devrun/env.sh
echo "start $(date +%T)"
timeout 545 python3 -m bench.proof --gpus 0 --runner direct --no-ablations --out $OUT/proof \
  --set 'data.long.sources=["sample-pictures"]' --set teacher.train.max_seconds=150 > $OUT/proof.log 2>&1 &
P=$!
sleep 20
timeout 500 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_model_gdn.py tests/test_model_mixers.py \
  tests/test_model_hybrid.py tests/test_teacher_logits_gpu.py tests/test_inference_streaming.py --durations=0 \
  > $OUT/gputests_b.log 2>&1; echo "tests rc=$? $(date +%T)"
wait $P; echo "proof rc=$? $(date +%T)"
tail -25 $OUT/gputests_b.log
grep -v -i warn $OUT/proof.log | tail -40
tar czf $OUT/jobs.tgz runs/proof/jobs runs/proof/main/*/logs 2>/dev/null
save_autotune
