"""Teacher logits: the teacher run once over the distillation shards, its top-k stored next to the tokens.

    encoding.py   the bytes of one covered position (bit-packed ids, log-probs, tail mass)
    coverage.py   which positions of a packed row are stored ("answer" or "text")
    teacher.py    loading, the vocabulary check, the packed forward and its top-k
    stream.py     the device loop (forward → top-k → encode, one step behind the host)
    shards.py     the shard row format
    store.py      shards per rank, markers, resume, manifest
    reader.py     TeacherLogitReader / TeacherTargets: what the KL loss reads per loader batch
    fidelity.py   KL(teacher ‖ reconstructed) and the top-k mass
    run.py        one job, in process or under torchrun
    stage.py      the run registry's `teacher-logits` stage

Nothing here imports prefect or s3fs, and the modules the GPU bench uses (encoding, stream, teacher,
shards, fidelity) import neither pipeline.data nor Pillow.
"""
