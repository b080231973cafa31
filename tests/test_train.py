"""The training stages on the tiny model: losses against hand computation, trainable groups, config errors
before the first step, 2-process ZeRO-2/3 runs on CPU (gloo), and an exact resume after SIGKILL."""

import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from pipeline import storage
from pipeline.train.job import TrainConfigError, TrainJob, check_job
from pipeline.kernel_cache import digest
from pipeline.train.losses import answer_cross_entropy, answer_positions, layer_mse, topk_kl
from pipeline.train.params import select_trainable

SECTION = dict(steps=6, lr=1e-3, warmup_steps=1, seq_len=512, micro_batch_size=1, grad_accum=1,
               trainable=["linear_attn", "sliding_attn"], checkpoint_every=2, launcher="torchrun", nproc_per_node=2,
               deepspeed_config=None, precision="fp32", zero_stage=2, grad_clip=1.0, weight_decay=0.0,
               min_lr_ratio=0.1, gradient_checkpointing=False, keep_last=2, loader_workers=0, loss_scale=1000.0)
STUDENT = dict(sliding_window=64, layer_period=4, expand_v=2.0, conv_size=4)


# -- losses -----------------------------------------------------------------------------------------------------

def test_answer_cross_entropy_is_per_supervised_token():
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(1, 5, 4)
    logits = head(hidden)
    labels = torch.tensor([[-100, 3, -100, 1, 6]])
    # position t predicts label t+1: pairs (0→3), (2→1), (3→6)
    assert answer_positions(labels).tolist() == [0, 2, 3]
    keep = answer_positions(labels)
    loss, n = answer_cross_entropy(hidden[0, keep], labels[0, keep + 1], head)
    ref = -(torch.log_softmax(logits[0, 0], -1)[3] + torch.log_softmax(logits[0, 2], -1)[1]
            + torch.log_softmax(logits[0, 3], -1)[6]) / 3
    assert n == 3 and torch.allclose(loss, ref)
    empty = torch.full((1, 5), -100)
    keep = answer_positions(empty)
    loss, n = answer_cross_entropy(hidden[0, keep], empty[0, keep + 1], head)
    assert n == 0 and loss == 0


class ModuleHead(torch.nn.Linear):
    """A head that must be called as a module (like a LoRA-wrapped or ZeRO-3-sharded one)."""


@pytest.mark.parametrize("head_class", [torch.nn.Linear, ModuleHead])
def test_chunked_head_loss_equals_the_whole_head_and_keeps_no_full_logits(head_class):
    """Chunks of 3 rows (one of 1 at the end), the head trainable: loss and gradients of the hidden states and
    the head weight equal cross-entropy over the whole [10, V] logits, and nothing saved for the backward pass
    is as big as those logits."""
    torch.manual_seed(0)
    V, N = 50, 10
    head = head_class(8, V, bias=False)
    hidden = torch.randn(N, 8, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, n = answer_cross_entropy(hidden, targets, head, max_elements=3 * V)
    (loss * 2).backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    ref = torch.nn.functional.cross_entropy(head(hidden), targets)
    (ref * 2).backward()
    assert n == N
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], head.weight.grad)
    assert max(saved, default=0) < N * V, saved
    head.weight.requires_grad_(False)
    hidden.grad = None
    loss, _ = answer_cross_entropy(hidden, targets, head, max_elements=3 * V)
    loss.backward()
    torch.testing.assert_close(hidden.grad * 2, grads[0])


def test_chunked_head_loss_takes_a_kernels_loss_and_gradient_that_overwrite_the_logits():
    """`loss_and_grad` (what fla's fused cross-entropy does on CUDA: the gradient written over the logits) gives
    the loss and gradients of autograd through the whole head."""
    from pipeline.train.losses import chunked_head_loss

    torch.manual_seed(0)
    V, N = 50, 10
    head = torch.nn.Linear(8, V, bias=False)
    hidden = torch.randn(N, 8, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    calls = []

    def by_hand(logits, c):  # Σ CE and softmax − onehot, in place like the kernel
        calls.append(c)
        lse = logits.logsumexp(-1)
        loss = (lse - logits.gather(-1, targets[c, None]).squeeze(-1)).sum()
        logits.sub_(lse[:, None]).exp_().scatter_add_(-1, targets[c, None], -torch.ones(len(lse), 1))
        return loss, logits

    def never(logits, c):
        raise AssertionError("autograd's loss_sum was called although loss_and_grad was given")

    loss = chunked_head_loss(hidden, head, never, 3 * V, by_hand)
    (loss * 0.5).backward()
    got = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (ref * 0.5).backward()
    assert [(c.start, c.stop) for c in calls] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], head.weight.grad)


@pytest.mark.gpu
def test_fused_cross_entropy_on_cuda_equals_torch_in_bf16():
    """answer_cross_entropy on CUDA goes through fla's fused cross-entropy kernels: loss and hidden-state gradient
    against F.cross_entropy over the whole bf16 logits (fp32 softmax), 4 chunks of the full vocabulary."""
    import pipeline.train.losses as losses

    torch.manual_seed(0)
    V, N, d = 151_936, 300, 256
    head = torch.nn.Linear(d, V, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, V, (N,), device="cuda")
    assert losses.use_fused(hidden)
    loss, n = losses.answer_cross_entropy(hidden, targets, head, max_elements=80 * V)
    loss.backward()
    got = hidden.grad.float().clone()
    hidden.grad = None
    ref = torch.nn.functional.cross_entropy(head(hidden).float(), targets)
    ref.backward()
    assert n == N
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    err = (got - hidden.grad.float()).abs().max() / hidden.grad.float().abs().max()
    assert err < 1e-2, err


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_student_objective_scores_only_the_kept_logits_as_if_all_were_computed(kind, chunked, tiny_teacher):
    """The objective runs the LM head only where its loss reads (in chunks of 2 rows when `chunked`); loss and
    gradients equal the same loss taken from the full logits."""
    from model import convert_from_qwen2_5_vl
    from pipeline.train.objectives import StudentObjective

    torch.manual_seed(0)
    student = convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8).float()
    T = 24
    ids = torch.randint(0, 200, (1, T))
    labels = torch.full((1, T), -100)
    labels[0, [5, 6, 15, 23]] = ids[0, [5, 6, 15, 23]]
    rows = torch.tensor([2, 9, 17])
    top_i = torch.randint(0, 200, (3, 4))
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T).expand(3, 1, T),
             "cu_seqlens": torch.tensor([0, 10, T], dtype=torch.int32), "logit_positions": rows,
             "topk_index": top_i, "topk_logit": torch.randn(3, 4)}
    objective = StudentObjective(student, kind, temperature=1.0)
    if chunked:
        objective.head_chunk_elements = 2 * student.lm_head.out_features
    loss, _ = objective(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    full = student(input_ids=ids, position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"]).logits[0]
    if kind == "ce":
        ref = torch.nn.functional.cross_entropy(full[:-1], labels[0, 1:], ignore_index=-100)
    else:
        ref = topk_kl(full[rows], top_i, batch["topk_logit"], None, 1.0)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    assert grads.keys() == {n for n, p in student.named_parameters() if p.grad is not None}
    for n, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_topk_kl_with_full_vocab_equals_exact_kl_and_scales_with_t_squared():
    torch.manual_seed(0)
    s, t = torch.randn(4, 11), torch.randn(4, 11)
    idx = torch.arange(11).expand(4, 11)
    for T in (1.0, 2.0):
        p = torch.softmax(t / T, -1)
        exact = (p * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
        assert torch.allclose(topk_kl(s, idx, t, None, T), exact, atol=1e-6)
    assert torch.allclose(topk_kl(s, idx, t, torch.logsumexp(t, -1), 1.0),
                          topk_kl(s, idx, t, None, 1.0), atol=1e-6)


def test_topk_kl_with_stored_partition_counts_the_tail_as_one_bucket():
    s, t = torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.tensor([[3.0, 0.5, 0.2, 0.1]])
    idx, top = torch.tensor([[0, 1]]), t[:, :2]
    lse = torch.logsumexp(t, -1)
    p, q = torch.softmax(t, -1)[0], torch.softmax(s, -1)[0]
    ref = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + \
        (p[2] + p[3]) * math.log((p[2] + p[3]) / (q[2] + q[3]))
    assert torch.allclose(topk_kl(s, idx, top, lse, 1.0), torch.tensor(float(ref)), atol=1e-6)


def test_layer_mse_ignores_masked_tokens():
    a, b = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [2.0, 2.0], [100.0, 100.0]]])
    assert layer_mse(a, b, torch.tensor([[1, 1, 0]])) == pytest.approx((1 + 1 + 4 + 4) / 4)


def test_packed_teacher_forward_keeps_documents_apart(tiny_teacher):
    """Stage I-a's targets come from the teacher's forward over a packed row: it must equal each document
    run alone (a shared KV cache would let documents see each other). Other families:
    tests/test_families_pipeline.py."""
    from model.positions import rope_index
    from pipeline.packed_teacher import PackedTeacher

    teacher, processor = tiny_teacher
    docs = [processor([processor.apply_chat_template([{"role": "user", "content": q}], True)])["input_ids"]
            for q in ("how many circles are there?", "what is the highest bar in the chart?")]
    ids = torch.cat(docs, 1)
    cu = torch.tensor([0, docs[0].shape[1], ids.shape[1]], dtype=torch.int32)
    pos = torch.cat([rope_index(teacher.config, d)[0] for d in docs], -1)
    packed = PackedTeacher(teacher)
    assert packed.model is teacher and not packed.takes_boundaries  # Qwen2.5-VL runs packed rows itself
    with torch.no_grad():
        hidden = packed.hidden_states({"input_ids": ids, "cu_seqlens": cu, "position_ids": pos})
        alone = torch.cat([teacher.model(input_ids=d).last_hidden_state for d in docs], 1)
    torch.testing.assert_close(hidden, alone, atol=1e-5, rtol=1e-4)


# -- trainable groups ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("share,decoder_recomputed", [(1.0, [1] * 8), (0.5, [0, 1] * 4), (2 / 3, [0, 1, 0, 1, 1, 0, 1, 1])])
def test_checkpointing_a_share_of_blocks_recomputes_those_blocks_and_leaves_gradients_alone(tiny_teacher, share,
                                                                                          decoder_recomputed):
    """The share is spread over each stack (8 decoder blocks: half is every second one, two thirds rounds to 5 of
    them): those run their forward again in the backward, the others once; the gradients equal a run without
    checkpointing."""
    from model import convert_from_qwen2_5_vl
    from pipeline.train.build import enable_checkpointing

    ids = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(0))

    def grads_and_calls(share):
        torch.manual_seed(0)
        student = convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8).float().train()
        if share:
            enable_checkpointing(student, share)
        layers = student.model.language_model.layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # a module inside the block (a recompute reruns it; it may stop early,
            # once every saved tensor is back, so the count is taken as the module starts)
            layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        student(input_ids=ids, labels=ids).loss.backward()
        return {k: p.grad for k, p in student.named_parameters() if p.grad is not None}, calls

    plain, plain_calls = grads_and_calls(None)
    got, calls = grads_and_calls(share)
    assert len(calls) == 8 and plain_calls == [1] * 8
    assert calls == [1 + r for r in decoder_recomputed]
    assert got.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(got[k], plain[k], atol=1e-6, rtol=1e-5)


def test_recomputed_blocks_are_spread_evenly():
    from pipeline.train.build import recomputed_blocks

    assert recomputed_blocks(36, 1.0) == set(range(36))
    assert recomputed_blocks(36, 0.5) == set(range(1, 36, 2))
    two_in_three = recomputed_blocks(36, 2 / 3)  # 24 blocks: the 2nd and 3rd of every three
    assert two_in_three == {i for i in range(36) if i % 3} and len(two_in_three) == 24
    assert recomputed_blocks(36, 0.01) == set()


def test_recompute_share_is_checked_and_leaves_the_stage_fingerprint_alone():
    from pydantic import ValidationError

    from pipeline.config import TrainStageSection
    from pipeline.stages import identity

    for bad in (0, 1.5):
        with pytest.raises(ValidationError, match="recompute_share"):
            TrainStageSection(**{**SECTION, "gradient_checkpointing": True, "recompute_share": bad})
    with pytest.raises(ValidationError, match="checkpoint_every_n_layers"):  # the field this one replaced
        TrainStageSection(**{**SECTION, "gradient_checkpointing": True, "checkpoint_every_n_layers": 2})
    a = TrainStageSection(**{**SECTION, "gradient_checkpointing": True})
    b = TrainStageSection(**{**SECTION, "gradient_checkpointing": True, "recompute_share": 0.5})
    assert identity(a) == identity(b)


def test_trainable_groups_select_exactly_their_parameters(tiny_teacher):
    from model import convert_from_qwen2_5_vl

    student = convert_from_qwen2_5_vl(tiny_teacher[0])
    types = student.config.text_config.layer_types
    counts = select_trainable(student, ["linear_attn"], types)
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained and all(".self_attn." in n and int(n.split("layers.")[1].split(".")[0]) % 4 for n in trained)
    assert counts["linear_attn"] == sum(p.numel() for n, p in student.named_parameters() if n in trained)
    with pytest.raises(ValueError, match="unknown group"):
        select_trainable(student, ["attention"], types)
    with pytest.raises(ValueError, match="lora"):
        select_trainable(student, ["lora"], types)


# -- runs --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny teacher and small packed corpora built by the data stage."""
    from model.tiny import build_tiny_teacher
    from pipeline.data.build import build_corpus
    from pipeline.data.config import CorpusConfig, SourceConfig
    from pipeline.data.synthetic import write_llava

    root = tmp_path_factory.mktemp("train")
    teacher, processor = build_tiny_teacher()
    teacher.save_pretrained(root / "teacher")
    processor.save_pretrained(root / "teacher")
    src = write_llava(root / "src", 24, seed=0)
    for name in ("distill", "instruct"):
        build_corpus(CorpusConfig(name=name, output=str(root / "data" / name), max_len=512, max_pixels=28 * 28 * 16,
                                  samples_per_shard=8, workers=1,
                                  sources=[SourceConfig(name="s", format="llava", path=str(src))]), progress=False)
    from pipeline.teacher_logits.run import run
    from pipeline.teacher_logits.store import StoreSettings

    run(str(root / "data" / "distill" / "manifest.json"), str(root / "teacher"), str(root / "logits"),
        StoreSettings(top_k=16, positions="answer", values="fp16", batch_size=2), max_bytes_per_token=300)
    return root


PREVIOUS = {"stage1a": "teacher", "stage1b": "stage1a-export", "stage2": "stage1b-export", "stage3": "stage2-export"}
CORPUS = {"stage1a": "distill", "stage1b": "distill", "stage2": "instruct", "stage3": "instruct"}


def _job(ws, stage, output, **section):
    """Each stage starts from the previous stage's export, as the pipeline chains them."""
    return TrainJob(stage=stage, section={**SECTION, **section}, student=STUDENT, init=str(ws / PREVIOUS[stage]),
                    teacher=str(ws / "teacher"), corpus=str(ws / "data" / CORPUS[stage] / "manifest.json"),
                    output=str(output), seed=0, logits=str(ws / "logits") if stage == "stage1b" else None)


def _launch(job: TrainJob, path, kill_after_step: int | None = None, env: dict | None = None,
            on_line=lambda line: None) -> str:
    job.dump(str(path))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={job.section.nproc_per_node}",
           "--standalone", "-m", "pipeline.train.worker", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    out = []
    for line in proc.stdout:
        out.append(line)
        on_line(line)
        if kill_after_step is not None and f"step {kill_after_step}/" in line:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group, mid-run, no chance to clean up
            break
    proc.wait()
    log = "".join(out)
    if kill_after_step is None:
        assert proc.returncode == 0, log[-3000:]
    return log


def _losses(output) -> dict[int, float]:
    with open(os.path.join(output, "logs", "steps.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def stage1a_zero3(workspace):
    """Stage I-a on 2 processes with ZeRO-3; its export is what the later runs start from."""
    out = workspace / "stage1a"
    job = _job(workspace, "stage1a", out, steps=3, checkpoint_every=3, zero_stage=3, trainable=["linear_attn"])
    # kernel tuning shared through the run root: an entry another node published, one this node's cache held
    # before the stage (not the run's: it stays local), one "tuned" while the stage runs (published)
    job.kernel_cache = str(workspace / "kernel_cache")
    cache = workspace / "triton_cache"
    theirs, before, tuned = (json.dumps({"key": [n], "configs_timings": []}) for n in (1, 2, 3))
    storage.write_json(f"{job.kernel_cache}/stage0-node0.json", {"entries": {TUNED[0]: theirs},
                                                                  "sha256": digest({TUNED[0]: theirs})})
    os.makedirs(cache / TUNED[1].split("/")[0])
    (cache / TUNED[1]).write_text(before)
    # and a Triton kernel another node compiled (restored), one this node compiles while the stage runs (published)
    from pipeline import kernel_cache

    theirs_kernel = {f"{KERNELS[0]}.json": b'{"name": "chunk_fwd_kernel_o"}', f"{KERNELS[0]}.cubin": b"\x7fELF o"}
    tar = kernel_cache.pack_kernels({KERNELS[0]: {name.split("/")[1]: _file(workspace / "k", name, data)
                                                  for name, data in theirs_kernel.items()}})
    storage.write_bytes(storage.join(job.kernel_cache, kernel_cache.KERNELS, kernel_cache.kernels_tag(), "n0.bin"),
                        kernel_cache.pack_compiled(tar, {KERNELS[0]}))

    def tune(line):
        if "stage1a ready on" in line:  # the worker is past its restore, before its first step
            os.makedirs(cache / TUNED[2].split("/")[0])
            (cache / TUNED[2]).write_text(tuned)
            files = {f"{KERNELS[1]}.{ext}": _file(cache, f"{KERNELS[1]}.{ext}", b"...") for ext in ("cubin", "json")}
            _file(cache, f"{KERNELS[1].split('/')[0]}/__grp__{KERNELS[1].split('/')[1]}.json",
                  json.dumps({"child_paths": {p.split("/")[-1]: p for p in files.values()}}).encode())

    log = _launch(job, workspace / "job1a.json", env={"TRITON_CACHE_DIR": str(cache)}, on_line=tune)
    os.symlink(out / "export", workspace / "stage1a-export")
    return out, log


TUNED = ("THEIRKEY/chunk_fwd_kernel_o.autotune.json", "OLDKEY/chunk_bwd_kernel_dv_local.autotune.json",
         "NEWKEY/chunk_gated_delta_rule_fwd_kernel_h.autotune.json")
KERNELS = ("THEIRKEY/chunk_fwd_kernel_o", "NEWKEY/chunk_gated_delta_rule_fwd_kernel_h")  # <key>/<kernel>


def _file(root, rel: str, data: bytes) -> str:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_a_stages_ready_line_says_where_its_start_up_went(stage1a_zero3):
    """The line before the first step names each part of the start-up with its seconds, and they add up to the
    total it gives: where a slow start on a fresh node went, without a profiler."""
    _, log = stage1a_zero3
    ready = [line for line in log.splitlines() if "stage1a ready on 2 ranks" in line]
    assert ready, log[-3000:]
    total, parts = re.search(r"nodes, ([0-9.]+) s after the process started: (.*?)(;|$)", ready[0]).group(1, 2)
    seconds = {name: float(value) for name, value in re.findall(r"([a-zA-Z' (),]+?) ([0-9.]+) s(?:, |$)", parts)}
    assert {"python and torch imports", "model built", "DeepSpeed and checkpoint restore"} <= set(seconds), parts
    assert seconds["python and torch imports"] > 0.5, parts  # torch alone takes longer than that to import
    assert abs(sum(seconds.values()) - float(total)) < 0.05 * len(seconds) + 0.1, ready[0]


def test_the_nodes_first_process_restores_and_publishes_kernel_tuning(workspace, stage1a_zero3):
    """Two processes on one node: the first fills the node's Triton cache from the run root before either builds
    anything, and publishes what was tuned on the node while the stage ran; the other does neither."""
    _, log = stage1a_zero3
    assert log.count("1 tuned kernel configurations from the run root") == 1, log[-3000:]
    assert json.loads((workspace / "triton_cache" / TUNED[0]).read_text())["key"] == [1]
    bundles = [storage.read_json(u) for u in storage.list_files(str(workspace / "kernel_cache"), suffix=".json")]
    assert sorted(sorted(b["entries"]) for b in bundles) == [[TUNED[2]], [TUNED[0]]], bundles
    assert log.count("1 tuned kernel configurations of this node that the run root lacked") == 1, log[-3000:]
    assert log.index("1 tuned kernel configurations") < log.index("trainable parameters")
    # Triton's compiled kernels the same way: the other node's in this node's cache (as Triton finds them, through
    # their group file), the one compiled here in a bundle of its own
    from pipeline import kernel_cache

    cache = str(workspace / "triton_cache")
    assert set(kernel_cache.local_kernels(cache)) == set(KERNELS)
    assert log.count("1 compiled Triton kernels from the run root") == 1, log[-3000:]
    assert log.count("1 compiled Triton kernels of this node that the run root lacked") == 1, log[-3000:]
    folder = storage.join(str(workspace / "kernel_cache"), kernel_cache.KERNELS, kernel_cache.kernels_tag())
    published = [kernel_cache.unpack_compiled(storage.read_bytes(u))[0] for u in storage.list_files(folder)]
    assert sorted(map(sorted, published)) == [[KERNELS[1]], [KERNELS[0]]], published


def test_stage1a_layerwise_mse_on_two_processes_with_zero3(stage1a_zero3):
    out, log = stage1a_zero3
    losses = _losses(out)
    assert losses[3] < losses[1], losses
    assert "trainable parameters linear_attn" in log
    # the time each step waited for its batches is logged beside the step's time (is the run input-bound?)
    with open(os.path.join(out, "logs", "steps.jsonl")) as f:
        steps = list(map(json.loads, f))
    # (the batches are prepared ahead in a thread: the wait is what the step lost, the preparing is hidden)
    assert all(0 < r["data_s"] < r["step_s"] and r["prepare_s"] > 0 for r in steps), steps
    assert re.search(r"waiting for data \d+% \(preparing it \d+%, ahead\)", log), log[-2000:]
    # the first step records the stage's start-up (process start to first step: bench/stage_startup.py)
    first = steps[0]
    assert first["step"] == 1 and first["device"] == "cpu", first
    assert first["step_s"] < first["first_step_after_start_s"] < 600, first
    assert {"python and torch imports", "model built"} <= set(first["startup_s"]), first  # the ready line's parts
    assert sum(first["startup_s"].values()) < first["first_step_after_start_s"] - first["step_s"] + 0.5, first
    assert all("first_step_after_start_s" not in r for r in steps[1:])
    assert re.search(r"stage1a: first step done \d+ s after the process started", log), log[-2000:]
    from model.checkpoint import load_pretrained
    from pipeline.checkpoints import list_checkpoints

    # every committed checkpoint holds the model in Hugging Face format too (what its evaluation reads)
    (_, checkpoint), = list_checkpoints(str(out))
    from_checkpoint, _ = load_pretrained(checkpoint)
    assert isinstance(from_checkpoint.config.text_config.layer_types, list)

    student, processor = load_pretrained(out / "export")
    assert student.config.text_config.layer_types[1] == "linear_attention" and processor is not None


@pytest.fixture(scope="module")
def stage1b_single(workspace, stage1a_zero3):
    """Stage I-b in one process, from the Stage I-a export, on the stored teacher top-k at temperature 2."""
    out = workspace / "stage1b"
    _launch(_job(workspace, "stage1b", out, steps=3, checkpoint_every=3, nproc_per_node=1, temperature=2.0,
                 trainable=["linear_attn"]), workspace / "job1b.json")
    os.symlink(out / "export", workspace / "stage1b-export")
    return out


def test_stage1b_kl_to_stored_teacher_logits_goes_down(stage1b_single):
    losses = _losses(stage1b_single)
    assert losses[3] < losses[1], losses


@pytest.fixture(scope="module")
def stage2_reference(workspace, stage1b_single):
    """Stage II on 2 processes with ZeRO-2, uninterrupted: the resume test's reference, and its export is
    Stage III's start."""
    out = workspace / "stage2-ref"
    _launch(_job(workspace, "stage2", out), workspace / "ref.json")
    os.symlink(out / "export", workspace / "stage2-export")
    return out


def test_zero2_run_killed_with_sigkill_resumes_to_the_same_losses(workspace, stage2_reference):
    killed = workspace / "stage2-killed"
    full = _losses(stage2_reference)
    assert list(full) == [1, 2, 3, 4, 5, 6] and full[6] < full[1]

    job = _job(workspace, "stage2", killed)
    _launch(job, workspace / "killed.json", kill_after_step=5)
    from pipeline.checkpoints import list_checkpoints

    assert [s for s, _ in list_checkpoints(str(killed))] == [2, 4]  # step 5 was never committed
    log = _launch(job, workspace / "killed.json")
    assert "resumed stage2 at step 4" in log
    resumed = _losses(killed)
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    for step in full:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), (step, resumed, full)
    # keep_last=2: only the two newest checkpoints remain
    assert [s for s, _ in list_checkpoints(str(killed))] == [4, 6]


def test_stage3_lora_trains_adapters_and_exports_merged_weights(workspace, stage2_reference):
    from safetensors.torch import load_file

    out = workspace / "stage3"
    log = _launch(_job(workspace, "stage3", out, steps=2, checkpoint_every=2, nproc_per_node=1, trainable=["lora"],
                       lora=dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], merge=True)),
                  workspace / "job3.json")
    assert "trainable parameters lora" in log
    before = load_file(workspace / "stage2-export" / "model.safetensors")
    after = load_file(out / "export" / "model.safetensors")
    assert set(before) == set(after)  # merged: plain student weights, no adapter tensors
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)[:5]


def test_config_errors_are_caught_before_the_first_step(workspace, stage1b_single):
    job = _job(workspace, "stage2", workspace / "bad", seq_len=4096)
    with pytest.raises(TrainConfigError, match="seq_len 4096 is above the shards' max_len 512"):
        check_job(job)
    job = _job(workspace, "stage2", workspace / "bad")
    job.init = str(workspace / "nowhere")
    with pytest.raises(TrainConfigError, match="no model at"):
        check_job(job)
    job = _job(workspace, "stage2", workspace / "bad")
    job.corpus = str(workspace / "data" / "missing" / "manifest.json")
    with pytest.raises(TrainConfigError, match="no packed corpus"):
        check_job(job)


def test_lora_target_that_matches_nothing_is_refused(workspace, stage1b_single):
    from pipeline.train.lora import add_lora
    from pipeline.train.objectives import load_student

    student = load_student(str(workspace / "stage1b-export"), torch.float32)
    with pytest.raises(ValueError, match="match no module"):
        add_lora(student, dict(r=4, alpha=8, dropout=0.0, target_modules=["not_a_module"]))


def test_lora_adapters_take_the_models_dtype(workspace, stage1b_single):
    """bf16 model → bf16 adapters: peft's default fp32 adapters made every LoRA matmul an fp32 GEMM plus casts
    (the student's 32K step on the H200: 15.0K tok/s with bf16 adapters against 12.2K with fp32 ones)."""
    from pipeline.train.lora import add_lora
    from pipeline.train.objectives import load_student

    student = load_student(str(workspace / "stage1b-export"), torch.bfloat16)
    student = add_lora(student, dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "g_proj"]))
    lora = {n: p.dtype for n, p in student.named_parameters() if "lora_" in n}
    assert lora and set(lora.values()) == {torch.bfloat16}, lora
    x = torch.randint(0, 100, (1, 16))
    assert student(input_ids=x).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_linears_compute_what_peft_computes(dropout):
    """The fused adapters (base GEMM, then addmm_ of the adapter product) against peft's own forward on copies of
    the same model: outputs and the gradients of the input, lora_A and lora_B (biased and bias-free bases, dropout
    on the adapter input drawn from the same seed); merged adapters and adapters in another dtype take peft's
    path."""
    import copy

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    from pipeline.train.lora import FusedLoraLinear, fuse_lora_linears

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 20, bias=True), torch.nn.Tanh(), torch.nn.Linear(20, 9, bias=False))
    config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["0", "2"], bias="none")
    plain = get_peft_model(base, config)
    for n, p in plain.named_parameters():
        if "lora_B" in n:  # peft starts B at zero: the adapter product would be zero and its A-gradient too
            torch.nn.init.normal_(p)
    fused = copy.deepcopy(plain)
    assert fuse_lora_linears(fused) == 2
    assert all(type(m) is Linear for m in plain.modules() if isinstance(m, Linear))
    x = torch.randn(2, 7, 12)

    def run(model):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        out = model(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), xi.grad, grads

    ref, ref_dx, ref_grads = run(plain)
    out, dx, grads = run(fused)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(dx, ref_dx)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for n in grads:  # the scale meets the gradient in another order: fp32 rounding apart
        scale = float(ref_grads[n].abs().max())
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-6 * scale, rtol=1e-5, msg=n)

    layer = fused.base_model.model[0]
    assert isinstance(layer, FusedLoraLinear) and layer._fusable_adapter(x, (), {}) == "default"
    assert layer._fusable_adapter(x.double(), (), {}) is None  # a cast: peft's path
    fused.eval(), plain.eval()
    fused.merge_adapter(), plain.merge_adapter()
    assert layer._fusable_adapter(x, (), {}) is None
    torch.testing.assert_close(fused(x), plain(x))


def _python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a fresh interpreter from the repository root; it must exit 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    return done


def test_worker_prints_its_stacks_on_sigusr1_and_goes_on():
    code = ("import os, signal, time\n"
            "from pipeline.train.worker import install_stack_dump\n"
            "def waiting_for_the_first_batch():\n"
            "    os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.5)\n"
            "install_stack_dump()\n"
            "waiting_for_the_first_batch()\n"
            "print('still running')\n")
    done = _python(code)
    assert done.stdout.strip() == "still running"
    assert "waiting_for_the_first_batch" in done.stderr and "Current thread" in done.stderr


def test_a_slow_first_step_prints_every_threads_stack_until_it_is_done():
    code = ("import os, sys, time\n"
            "os.environ['INFINITEVL_FIRST_STEP_STACKS_S'] = '0.2'\n"
            "from pipeline.train.worker import watch_first_step, first_step_done\n"
            "def compiling_the_first_step():\n"
            "    time.sleep(1.0)\n"
            "assert watch_first_step() == 0.2\n"
            "compiling_the_first_step()\n"
            "first_step_done()\n"
            "print('FIRST STEP DONE', file=sys.stderr, flush=True)\n"
            "time.sleep(0.8)\n")
    done = _python(code)
    before, after = done.stderr.split("FIRST STEP DONE")
    assert before.count("compiling_the_first_step") >= 2  # every 0.2 s while it lasts, not once
    assert "Thread" in before and "compiling_the_first_step" not in after and "Thread" not in after


def test_an_all_sliding_student_passes_stages_1a_and_1b_on_as_the_converted_teacher(workspace, tmp_path):
    """Stages I-a and I-b train only linear mixers; a student with none (every layer sliding attention) has nothing
    to learn there: I-a commits the teacher converted as the student section says, I-b commits I-a's export again,
    byte for byte, both with their file lists. A student with linear layers is not taken for one."""
    import logging
    import types

    from safetensors.torch import load_file

    from model import convert_teacher, load_teacher
    from pipeline import storage
    from pipeline.train.job import export_untrained, linear_layers

    n = load_teacher(str(workspace / "teacher")).config.text_config.num_hidden_layers
    student = {**STUDENT, "layer_types": ["sliding_attention"] * n}
    assert linear_layers(_job(workspace, "stage1a", tmp_path / "x")) != []  # the default layout has them
    outputs = {}
    for stage, init in (("stage1a", None), ("stage1b", "stage1a")):
        job = _job(workspace, stage, tmp_path / stage, trainable=["linear_attn"])
        job.student = type(job.student)(**student)
        if init:
            job.init = outputs[init]
        assert linear_layers(job) == []
        ctx = types.SimpleNamespace(name=stage, output=str(tmp_path / stage), log=logging.getLogger("test"))
        result = export_untrained(ctx, job)
        assert result["steps"] == 0 and result["export"] == str(tmp_path / stage / "export")
        outputs[stage] = result["export"]
    expected = convert_teacher(load_teacher(str(workspace / "teacher")), layer_types=["sliding_attention"] * n,
                               sliding_window=STUDENT["sliding_window"]).state_dict()
    weights = {}
    for stage, export in outputs.items():
        files = storage.committed_files(export)
        assert files and all(os.path.exists(os.path.join(export, rel)) for rel in files)
        weights[stage] = {k: v for f in files if f.endswith(".safetensors")
                          for k, v in load_file(os.path.join(export, f)).items()}
    assert set(expected) - set(weights["stage1a"]) <= {"lm_head.weight"}  # tied to the embeddings, saved once
    for k, v in weights["stage1a"].items():
        assert torch.equal(v, expected[k]), k
    assert storage.committed_files(outputs["stage1b"]) == storage.committed_files(outputs["stage1a"])


def test_a_cpu_rank_joins_its_group_past_a_lock_a_killed_run_left_in_torchs_extension_cache(tmp_path):
    """A run killed while DeepSpeed JIT-built its CPU shared-memory op leaves the build's lock file behind: the next
    run's ranks must not wait on it (they did, forever: torch's FileBaton polls until the file goes)."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    code = """if True:
        import os
        from torch.utils.cpp_extension import _get_build_directory
        lock = os.path.join(_get_build_directory("deepspeed_shm_comm", False), "lock")
        open(lock, "w").close()
        from pipeline.train.worker import join_process_group
        print("joined", join_process_group()[:3], os.path.exists(lock))
    """
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the rank waited on the stale lock: {e.stdout!r}") from None
    assert out.returncode == 0 and "joined (0, 1, 0) True" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.parametrize("workers", [0, 3])
def test_the_worker_reads_its_loader_processes_before_checking_the_job(tmp_path, workers):
    """The fork server starts before the job's check imports the model's code: its count is read from the dumped
    job as the checked job would give it."""
    from pipeline.train.worker import _loader_workers

    path = tmp_path / "job.json"
    _job(tmp_path, "stage2", tmp_path / "out", loader_workers=workers).dump(str(path))
    assert _loader_workers(str(path)) == TrainJob.load(str(path)).section.loader_workers == workers
