"""The training stages: Stage I-a (layer-wise MSE), I-b (end-to-end KL), II (SFT), III (long-sequence LoRA).

Each stage's function (`stage1a.train_stage1a(ctx)`, ...) writes a job file and launches `pipeline.train.worker`
as a torchrun/deepspeed subprocess group; the worker trains on DeepSpeed ZeRO, checkpoints to fsspec storage
and exports the result in Hugging Face format, which the next stage reads.
"""
