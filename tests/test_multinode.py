"""Stages on several nodes, on CPU: torchrun agents on 127.0.0.1 (one process each, gloo), joined by the c10d
rendezvous on the store a leader hosts (pipeline/multinode.py), each agent started by a real follower process
the way a Kubernetes pod or a Slurm task starts one. Stage II across two agents trains to the losses of one agent
with two processes; a follower SIGKILLed mid-run with its agent and rank (a node lost) makes the group restart
when its replacement arrives, and the run ends on an uninterrupted run's losses; the teacher-logit stage across
two agents stores the bytes one process stores and says so in its manifest; the eval stage on two agents answers
as one process does. Then the platforms: the Kubernetes Job and Service against the official client's schema,
the sbatch script run with stand-ins for srun and scontrol, and submitting and following a Slurm job."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import psutil
import pytest
import torch

from pipeline import storage
from pipeline.config import load_config
from pipeline.multinode import Board, LaunchConfigError, launch_problems, rendezvous_id
from pipeline.stages import StageContext

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2 = ["train.stage2.steps=4", "train.stage2.checkpoint_every=2", "train.stage2.keep_last=2",
          "train.stage2.lr=1.0e-3", "train.stage2.warmup_steps=1", "train.stage2.launcher=torchrun",
          "train.stage2.trainable=[linear_attn, sliding_attn]", "train.stage2.loader_workers=0"]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_teacher):
    """The saved tiny teacher, an instruct corpus of 512-token rows, a student converted from the teacher (what
    Stage II starts from), and a distillation corpus of 4 shards for the teacher-logit stage."""
    from model import convert_from_qwen2_5_vl
    from pipeline.data.build import build_corpus
    from pipeline.data.config import CorpusConfig, SourceConfig
    from pipeline.data.synthetic import write_llava
    from tests.test_teacher_logits_helpers import build_small_corpus

    root = tmp_path_factory.mktemp("multinode")
    teacher, processor = tiny_teacher
    for folder in ("teacher", "init"):
        processor.save_pretrained(root / folder)
    teacher.save_pretrained(root / "teacher")
    torch.manual_seed(0)
    convert_from_qwen2_5_vl(teacher, sliding_window=64, init="random").save_pretrained(root / "init")
    src = write_llava(root / "src", 24, seed=0)
    build_corpus(CorpusConfig(name="instruct", output=str(root / "data" / "instruct"), max_len=512,
                              max_pixels=28 * 28 * 16, samples_per_shard=8, workers=1,
                              sources=[SourceConfig(name="s", format="llava", path=str(src))]), progress=False)
    build_small_corpus(root / "data", "distill")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def leader_node(tmp_path):
    """The leader's store for the whole run, and a way to start follower nodes against it (each its own
    `python -m pipeline.multinode follow` process, logging to a file, with a staging folder of its own as a
    separate machine would have)."""
    endpoint = f"127.0.0.1:{_free_port()}"
    board = Board.host(endpoint)
    followers: list[tuple[subprocess.Popen, str]] = []

    def start_follower(name: str) -> tuple[subprocess.Popen, str]:
        out = str(tmp_path / f"{name}.log")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "INFINITEVL_STAGING": str(tmp_path / f"staging-{name}")}
        with open(out, "w") as f:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.multinode", "follow", "--endpoint", endpoint],
                                    stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        followers.append((proc, out))
        return proc, out

    try:
        yield endpoint, board, start_follower
        board.finish_run(0)
        for proc, out in followers:
            if proc.poll() is None or proc.returncode != -signal.SIGKILL:
                assert proc.wait(timeout=60) == 0, open(out).read()[-3000:]
    finally:
        for proc, _ in followers:
            _kill_tree(proc.pid)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started, all at once: a node that dies."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _stage2(workspace, name: str, overrides: list[str]):
    config = load_config("configs/tiny.yaml", [f"run.root={workspace / 'runs' / name}", *STAGE2, *overrides])
    logger = logging.getLogger(f"test.multinode.{name}")
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    output = str(workspace / "runs" / name / "stage2" / "attempt-0001")
    ctx = StageContext("stage2", config, output, {"teacher": str(workspace / "teacher"),
                                                  "data": str(workspace / "data")}, logger)
    return ctx, handler


def _train(ctx, workspace) -> dict:
    from pipeline.train.job import run_training

    return run_training(ctx, init=str(workspace / "init"))


def _losses(output: str) -> list[tuple[int, float]]:
    with open(os.path.join(output, "logs", "steps.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def one_agent_two_processes(workspace):
    """The reference: Stage II on one node, torchrun with two processes (c10d on a store of its own)."""
    ctx, handler = _stage2(workspace, "one-agent", ["train.stage2.nproc_per_node=2"])
    started = time.monotonic()
    _train(ctx, workspace)
    seconds = time.monotonic() - started
    assert any(f"--rdzv-id={rendezvous_id(ctx.output)}" in line for line in handler.lines), handler.lines[:3]
    return _losses(ctx.output), seconds


def test_stage2_on_two_agents_trains_to_one_agents_losses(workspace, one_agent_two_processes, tmp_path):
    reference, reference_s = one_agent_two_processes
    assert [s for s, _ in reference] == [1, 2, 3, 4] and reference[-1][1] < reference[0][1]
    with leader_node(tmp_path) as (endpoint, board, start_follower):
        _, follower_log = start_follower("node1")
        ctx, handler = _stage2(workspace, "two-agents", ["launch.nnodes=2", "launch.nproc_per_node=1",
                                                         f"launch.rdzv_endpoint={endpoint}"])
        started = time.monotonic()
        result = _train(ctx, workspace)
        seconds = time.monotonic() - started
        assert board.ended(board.latest()) == "ok"
    follower = open(follower_log).read()
    # the follower ran the launch the leader posted: the same rendezvous, on the same store
    run_id = f"{rendezvous_id(ctx.output)}-1"
    assert f"--rdzv-id={run_id}" in follower and f"--rdzv-endpoint={endpoint}" in follower, follower[-2000:]
    assert "--nnodes=2" in follower and "is_host=false" in follower
    assert "the leader's run ended (exit code 0)" in follower
    two = _losses(ctx.output)
    assert [s for s, _ in two] == [s for s, _ in reference]
    for (step, got), (_, want) in zip(two, reference):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (step, two, reference)
    assert result["steps"] == 4 and os.path.exists(os.path.join(result["export"], "model.safetensors"))
    print(f"\none agent, two processes: {reference_s:.1f} s; two agents, one process each: {seconds:.1f} s")


def test_a_lost_node_restarts_the_group_which_resumes_to_the_same_losses(workspace, one_agent_two_processes,
                                                                          tmp_path):
    """The follower node dies (SIGKILL to it, its agent and its rank) once step 2's checkpoint is committed; the
    leader's rank fails at its next collective, its agent re-rendezvouses, the platform's replacement follower
    joins the running launch, and every rank resumes from the newest committed checkpoint."""
    from pipeline.checkpoints import list_checkpoints

    reference, _ = one_agent_two_processes
    with leader_node(tmp_path) as (endpoint, board, start_follower):
        first, _ = start_follower("node1")
        ctx, handler = _stage2(workspace, "lost-node", ["launch.nnodes=2", "launch.nproc_per_node=1",
                                                        f"launch.rdzv_endpoint={endpoint}",
                                                        "launch.join_timeout_s=120"])
        killed: list[int] = []

        def lose_a_node_then_replace_it():
            while not list_checkpoints(ctx.output):
                time.sleep(0.1)
            killed.append(max(s for s, _ in list_checkpoints(ctx.output)))
            _kill_tree(first.pid)
            start_follower("node1-replacement")

        node_loss = threading.Thread(target=lose_a_node_then_replace_it, daemon=True)
        node_loss.start()
        started = time.monotonic()
        _train(ctx, workspace)
        seconds = time.monotonic() - started
        node_loss.join(timeout=10)
    assert killed and killed[0] < 4, killed
    leader = "\n".join(handler.lines)
    logs = leader + open(tmp_path / "node1-replacement.log").read()
    # the leader's agent restarted its rank, the group formed again on two nodes, its rank 0 resumed from the
    # newest committed checkpoint
    assert "stage2: torchrun's agent restarted this node's ranks (group restart 1)" in leader, leader[-4000:]
    assert logs.count("stage2 ready on 2 ranks, 2 nodes") == 2, logs[-4000:]
    resumed = [int(n) for n in __import__("re").findall(r"resumed stage2 at step (\d+)", logs)]
    assert resumed and resumed[0] >= killed[0], (resumed, killed)
    after = _losses(ctx.output)
    assert [s for s, _ in after] == [1, 2, 3, 4]  # each step once: those after the checkpoint taken again
    for (step, got), (_, want) in zip(after, reference):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (step, after, reference)
    print(f"\nkilled after checkpoint {killed[0]}, resumed at {resumed[0]}; the whole run took {seconds:.1f} s")


def test_teacher_logits_on_two_agents_store_the_bytes_one_process_stores(workspace, tmp_path, monkeypatch):
    """Each agent's rank computes its own shards; every shard is byte for byte what one process writes (the ranks
    sum in as many threads as the reference process does), and the manifests say who computed them."""
    from pipeline.data.loader import read_manifest
    from pipeline.recipes.teacher_logits import run as teacher_logits_stage
    from pipeline.teacher_logits.run import run
    from pipeline.teacher_logits.store import StoreSettings

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    settings = StoreSettings(top_k=8, positions="answer", values="fp16", batch_size=2)
    one = str(tmp_path / "one")
    run(str(workspace / "data" / "distill" / "manifest.json"), str(workspace / "teacher"), one, settings,
        max_bytes_per_token=300, progress=False)
    with leader_node(tmp_path) as (endpoint, board, start_follower):
        start_follower("node1")
        config = load_config("configs/tiny.yaml", ["teacher_logits.top_k=8", "teacher_logits.batch_size=2",
                                                   "launch.nnodes=2", f"launch.rdzv_endpoint={endpoint}"])
        output = str(tmp_path / "teacher-logits" / "attempt-0001")
        teacher_logits_stage(StageContext("teacher-logits", config, output,
                                          {"teacher": str(workspace / "teacher"), "data": str(workspace / "data")},
                                          logging.getLogger("test.multinode.logits")))
    manifest = storage.read_json(os.path.join(output, "manifest.json"))
    alone = storage.read_json(os.path.join(one, "manifest.json"))
    assert len(manifest["shards"]) == 4 and manifest["covered"] == alone["covered"] > 0
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in alone["shards"]]
    host = socket.gethostname()
    assert manifest["ran_on"] == {"nodes": 2, "ranks": 2, "hosts": [host]}
    assert alone["ran_on"] == {"nodes": 1, "ranks": 1, "hosts": [host]}
    markers = [storage.read_json(os.path.join(output, s["file"].replace(".arrow", ".done.json")))
               for s in manifest["shards"]]
    assert [m["rank"] for m in markers] == [0, 1, 0, 1]  # shard i on rank i mod 2: each agent wrote its own
    # the data stage's manifest says how its corpus was built too
    data = read_manifest(str(workspace / "data" / "distill" / "manifest.json"))
    assert data["ran_on"] == {"engine": "process", "workers": 1, "nodes": 1, "hosts": [host]}


def test_eval_on_two_agents_reports_what_one_process_reports(workspace, tmp_path):
    """The eval stage under torchrun on two nodes (pipeline/eval/worker.py): each rank answers its share, rank 0
    merges them in sample order; the per-sample answers and the scores equal the in-process evaluation's."""
    from pipeline.recipes.eval import run as eval_stage

    overrides = ["eval.target=teacher", "eval.benchmarks=[tiny]", "eval.max_samples=5", "eval.max_new_tokens=2"]
    inputs = {"teacher": str(workspace / "teacher")}
    log = logging.getLogger("test.multinode.eval")
    alone = eval_stage(StageContext("eval", load_config("configs/tiny.yaml", overrides), str(tmp_path / "one"),
                                    inputs, log))
    with leader_node(tmp_path) as (endpoint, board, start_follower):
        start_follower("node1")
        config = load_config("configs/tiny.yaml", [*overrides, "launch.nnodes=2", f"launch.rdzv_endpoint={endpoint}"])
        two = eval_stage(StageContext("eval", config, str(tmp_path / "two"), inputs, log))
        assert board.ended(board.latest()) == "ok"
    answers = [(tmp_path / run / "tiny" / "samples.jsonl").read_text().splitlines() for run in ("one", "two")]
    assert len(answers[0]) == 5 and answers[1] == answers[0]
    assert {k: v for k, v in two.items() if k != "checkpoint"} == {k: v for k, v in alone.items() if k != "checkpoint"}


def test_a_multinode_launch_that_cannot_start_is_refused_before_any_agent(monkeypatch, tmp_path):
    monkeypatch.delenv("INFINITEVL_RDZV_ENDPOINT", raising=False)
    config = load_config("configs/tiny.yaml", ["launch.nnodes=2", "train.stage2.launcher=deepspeed"])
    problems = launch_problems(config, config.train.stage2.launcher, "train.stage2")
    assert any(p.startswith("train.stage2.launcher: deepspeed") for p in problems), problems
    assert any(p.startswith("launch.rdzv_endpoint: launch.nnodes is 2") for p in problems), problems
    monkeypatch.setenv("INFINITEVL_RDZV_ENDPOINT", "node0:29400")
    monkeypatch.setenv("INFINITEVL_NNODES", "4")
    assert launch_problems(config) == ["launch.nnodes is 2 but this job has 4 nodes (INFINITEVL_NNODES)"]
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="launch.min_nnodes"):
        load_config("configs/tiny.yaml", ["launch.nnodes=2", "launch.min_nnodes=3"])
    with pytest.raises(ConfigError, match="host:port"):
        load_config("configs/tiny.yaml", ["launch.rdzv_endpoint=node0"])
    # nobody hosts the store: the follower says so instead of waiting forever
    with pytest.raises(LaunchConfigError, match="nothing hosts the rendezvous store"):
        Board.connect(f"127.0.0.1:{_free_port()}", wait_s=0)


# -- the platforms: Kubernetes and Slurm, rendered from the run config -------------------------------------------

TWO_BY_EIGHT = ["launch.nnodes=2", "launch.nproc_per_node=8"]
COMMAND = ["infinitevl", "run", "configs/infinitevl_4b.yaml", "--set", "launch.nnodes=2"]


def test_kubernetes_job_for_two_nodes_of_eight_gpus_passes_the_api_schema():
    """Rendered as Prefect's worker renders the work pool's template, then validated by the official client's
    models (extra fields forbidden, types and required fields checked)."""
    from kubernetes.client.models import V1Job, V1Service

    from infra.k8s.render import job_variables, render_job, render_service

    config = load_config("configs/infinitevl_4b.yaml", TWO_BY_EIGHT)
    assert job_variables(config, "registry/infinitevl:1") == {"nodes": 2, "gpus": 8, "image": "registry/infinitevl:1"}
    job = render_job({**job_variables(config, "registry/infinitevl:1"), "name": "run", "namespace": "ml"}, COMMAND)
    pod = job["spec"]["template"]["spec"]
    # Prefect's Kubernetes worker refuses a template without these two in the pod spec (its base manifest puts
    # them there); the API server drops them, so the schema check goes without them
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    container = pod["containers"][0]
    # a resource quantity is int-or-string in the API; the Python client types it as a string
    for kind in ("limits", "requests"):
        container["resources"][kind] = {k: str(v) for k, v in container["resources"][kind].items()}
    V1Job.model_validate(job)
    service = render_service("ml")
    V1Service.model_validate(service)

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8" and container["image"] == "registry/infinitevl:1"
    assert container["command"][:4] == ["python", "-m", "pipeline.multinode", "node"]
    assert "--nnodes=2" in container["command"] and container["command"][-1] == "--" and container["args"] == COMMAND
    # the pods' DNS names come from the headless Service: its name is their subdomain, its selector their label
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    port = service["spec"]["ports"][0]["port"]
    assert f"--port={port}" in container["command"] and container["ports"][0]["containerPort"] == port
    # a leader that failed (86) or a follower that lost its leader (87) fails the Job; other pods are replaced
    rule, = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [86, 87]
    assert spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0


def test_a_pod_of_the_indexed_job_finds_pod_0(monkeypatch):
    from pipeline import multinode

    monkeypatch.delenv("INFINITEVL_RDZV_ENDPOINT", raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setattr(multinode.socket, "gethostname", lambda: "tiny-x7k2p-1")
    assert multinode.node_rank() == 1
    assert multinode.platform_endpoint(29400, "infinitevl-rdzv") == "tiny-x7k2p-0.infinitevl-rdzv:29400"


def _fake_tools(folder, tools: dict[str, str]) -> dict:
    folder.mkdir(exist_ok=True)
    for name, body in tools.items():
        (folder / name).write_text("#!/bin/bash\n" + body)
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def test_sbatch_script_for_two_nodes_of_eight_gpus_leads_on_the_first_node_and_follows_on_the_second(tmp_path):
    """The script is valid bash with the allocation in its #SBATCH lines; run by a stand-in for srun that starts
    its tasks on this machine (SLURM_NODEID 0 and 1), node 0 runs the command with the rendezvous endpoint of the
    first host in the allocation and node 1 follows until the command is done."""
    from infra.slurm.submit import render_sbatch

    config = load_config("configs/infinitevl_4b.yaml", TWO_BY_EIGHT)
    port = _free_port()
    probe = [sys.executable, "-c", "import os; print('leader ran with', os.environ['INFINITEVL_RDZV_ENDPOINT'], "
                                   "os.environ['INFINITEVL_NNODES'])"]
    script = render_sbatch(config, probe, output=str(tmp_path / "out.log"), workdir=REPO, python=sys.executable,
                           port=port)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    directives = dict(line.removeprefix("#SBATCH ").split("=", 1) for line in script.splitlines()
                      if line.startswith("#SBATCH "))
    assert directives == {"--job-name": "infinitevl-4b", "--nodes": "2", "--ntasks-per-node": "1",
                          "--gpus-per-node": "8", "--output": str(tmp_path / "out.log"), "--open-mode": "append"}
    env = _fake_tools(tmp_path / "bin", {
        "scontrol": 'echo 127.0.0.1; echo 127.0.0.2\n',
        # srun: skip its options, start one task per node with that node's SLURM_NODEID, wait for all
        "srun": 'while [[ "$1" == --* ]]; do shift; done\n'
                'for i in 0 1; do SLURM_NODEID=$i "$@" > "$TASKS/task$i.log" 2>&1 & done\nwait\n'})
    env.update(SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2", TASKS=str(tmp_path))
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    leader, follower = (tmp_path / "task0.log").read_text(), (tmp_path / "task1.log").read_text()
    assert f"leader ran with 127.0.0.1:{port} 2" in leader, leader
    assert "the leader's run ended (exit code 0)" in follower, follower


def test_submitting_follows_the_job_to_its_end_and_says_why_it_failed(tmp_path):
    from infra.slurm import submit as slurm

    config = load_config("configs/tiny.yaml", ["launch.nnodes=2"])
    output = tmp_path / "job.out"
    env = _fake_tools(tmp_path / "bin", {
        "sbatch": f'echo "$@" > {tmp_path}/sbatch.args; cp "${{@: -1}}" {tmp_path}/submitted.sbatch\n'
                  'echo "4242;cluster"\n',
        # in the queue for two polls, writing its output meanwhile; then gone
        "squeue": f'n=$(cat {tmp_path}/polls 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/polls\n'
                  f'if [ $n -lt 2 ]; then echo "step $n" >> {output}; echo RUNNING; fi\n',
        "sacct": 'echo "FAILED|86:0"\n', "scancel": f'echo "$@" > {tmp_path}/scancel.args\n'})
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PATH", env["PATH"])
    try:
        logger = logging.getLogger("test.multinode.slurm")
        handler = Lines()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        with pytest.raises(slurm.SlurmJobFailed) as failed:
            slurm.run_on_slurm(config, ["infinitevl", "run", "configs/tiny.yaml"], logger, output=str(output),
                               poll_s=0.01)
        assert (failed.value.job_id, failed.value.state, failed.value.exit_code) == ("4242", "FAILED", "86:0")
        assert failed.value.tail == ["step 0", "step 1"] and "step 1" in handler.lines
        assert "--nodes=2" in (tmp_path / "submitted.sbatch").read_text()
        assert (tmp_path / "sbatch.args").read_text().startswith("--parsable")
        assert not (tmp_path / "scancel.args").exists()  # a job that failed on its own is not cancelled
        monkeypatch.setenv("PATH", "/nonexistent")
        with pytest.raises(slurm.SlurmError, match="sbatch is not on PATH"):
            slurm.run_on_slurm(config, ["true"], logger, output=str(output))
    finally:
        monkeypatch.undo()


def test_the_slurm_flow_submits_the_run_and_follows_it(tmp_path, prefect_server):
    """`infinitevl/slurm-pipeline` as a Prefect flow run: the job's script runs the stage's CLI command with the
    flow's overrides on the first node, its output reaches the flow's log, and the job's end is the run's."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import slurm_pipeline

    env = _fake_tools(tmp_path / "bin", {
        "sbatch": f'cp "${{@: -1}}" {tmp_path}/submitted.sbatch; echo "77"\n',
        "squeue": f'n=$(cat {tmp_path}/polls 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/polls\n'
                  'if [ $n -lt 1 ]; then echo RUNNING; fi\n',
        "sacct": 'echo "COMPLETED|0:0"\n', "scancel": "true\n"})
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("PATH", env["PATH"])
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            state = slurm_pipeline(config="configs/tiny.yaml", overrides=["launch.nnodes=2"], stages=["teacher"],
                                   force=["teacher"])
        assert state == "COMPLETED"
        script = (tmp_path / "submitted.sbatch").read_text()
        assert "--nodes=2" in script
        assert "infinitevl stage teacher configs/tiny.yaml --set=launch.nnodes=2 --force" in script
    finally:
        monkeypatch.undo()
