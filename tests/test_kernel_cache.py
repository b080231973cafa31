"""Kernel tuning shared through the run root (pipeline/kernel_cache.py): two nodes' Triton caches, their
bundles in a local run root and on S3 (SeaweedFS), damaged bundles and entries skipped with their cause."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import storage
from pipeline.kernel_cache import FOLDER, KernelCache, digest, local_entries, triton_cache_dir

# entries as Triton 3.6 writes them: <key hash>/<kernel>.autotune.json
A = "2PHMRZ5CQWX7OJ6TGJDZ4BGOM5F6RXQY3E7KAWVH3ZQNAZB4WNHA/chunk_bwd_kernel_dv_local.autotune.json"
B = "IAUF5Q4ZJ6ZKWUPEHN4QOYT2HUJYD2H6UYTG43TBQU2YOS2SUMMA/chunk_fwd_kernel_o.autotune.json"
C = "Q3VJ7A2SDVXLLCZBFSP6WHB3WJMSUDXRTFSC6NUAKXMQNEGN7VVQ/causal_conv1d_fwd_kernel.autotune.json"
D = "V7TSXHCZ2CQ6MOLUQ4PZHT4F6ZJ2NNRMZLVOEVX4YVOQT7U3XGUQ/l2norm_fwd_kernel.autotune.json"


def _entry(block: int) -> str:
    return json.dumps({"key": [4, 4, 64, 64, 64, "torch.bfloat16"], "configs_timings": [[{"kwargs": {"BV": block},
                       "num_warps": 4, "num_stages": 2}, [0.012]]]})


def _write(cache, rel, text):
    path = os.path.join(cache, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _bundles(url):
    return [json.loads(storage.read_bytes(u)) for u in storage.list_files(url, suffix=".json")]


def _roundtrip(url, tmp_path):
    one, two = str(tmp_path / "node1"), str(tmp_path / "node2")
    first = KernelCache(url, one, name="stage2")
    assert first.restore() == 0 and storage.list_files(url) == []
    _write(one, A, _entry(32))  # tuned while the stage runs
    _write(one, B, _entry(64))
    os.makedirs(os.path.join(one, "OTHERKEY"))
    _write(one, "OTHERKEY/chunk_fwd_kernel_o.cubin", "binary")  # compiled kernels stay on their node
    count, bundle_url = first.publish()
    assert count == 2 and bundle_url.startswith(url)
    (bundle,) = _bundles(url)
    assert bundle["entries"] == {A: _entry(32), B: _entry(64)} and bundle["sha256"] == digest(bundle["entries"])

    _write(two, A, _entry(128))  # in this node's cache before the stage: kept as it is
    _write(two, D, _entry(8))    # and one the run never tuned (another run's, or shipped): it stays local
    second = KernelCache(url, two, name="stage3")
    assert second.restore() == 1
    assert local_entries(two) == {A: _entry(128), B: _entry(64), D: _entry(8)}
    assert second.publish() == (0, None) and len(_bundles(url)) == 1  # nothing tuned here the run root lacks
    _write(two, C, _entry(16))
    _write(two, D, _entry(4))    # tuned again here: changed, so it goes
    assert second.publish()[0] == 2
    assert sorted(sorted(b["entries"]) for b in _bundles(url)) == [sorted([A, B]), sorted([C, D])]
    assert first.publish() == (0, None)  # the other node's bundle is read before deciding what is new
    third = KernelCache(url, str(tmp_path / "node3"))
    assert third.restore() == 4
    assert local_entries(third.cache_dir) == {A: _entry(32), B: _entry(64), C: _entry(16), D: _entry(4)}


def test_two_nodes_share_their_tuned_kernels_through_a_local_run_root(tmp_path):
    _roundtrip(str(tmp_path / "run" / FOLDER), tmp_path)


@pytest.mark.usefixtures("s3_env")
def test_two_nodes_share_their_tuned_kernels_through_an_s3_run_root(s3, tmp_path, monkeypatch):
    _roundtrip(s3.fresh("run") + "/" + FOLDER, tmp_path)
    # compiled bundles through S3: written whole, loaded with their digest checked, dedup by their headers
    from pipeline import kernel_cache

    url = s3.fresh("run") + "/" + FOLDER
    monkeypatch.setattr(kernel_cache, "compiled_artifacts", lambda: (b"\x00graphs\n\xff", {"inductor:a", "pgo:b"}))
    assert KernelCache(url, str(tmp_path / "n1")).publish_compiled()[0] == 2
    loads = []
    monkeypatch.setattr("torch.compiler.load_cache_artifacts", lambda b: loads.append(b) or object())
    assert KernelCache(url, str(tmp_path / "n2")).restore_compiled() == 2 and loads == [b"\x00graphs\n\xff"]
    assert KernelCache(url, str(tmp_path / "n3")).publish_compiled() == (0, None)
    # Triton's compiled kernels through S3 the same way
    node = KernelCache(url, str(tmp_path / "k1"))
    _compiled(monkeypatch, tmp_path / "k1", K1, "chunk_fwd_kernel_o", b"\x7fELF\x00o")
    assert node.publish_kernels()[0] == 1
    assert KernelCache(url, str(tmp_path / "k2")).restore_kernels() == 1
    assert _found_by_triton(monkeypatch, tmp_path / "k2", K1, "chunk_fwd_kernel_o")["chunk_fwd_kernel_o.cubin"] == \
        b"\x7fELF\x00o"
    assert KernelCache(url, str(tmp_path / "k2")).publish_kernels() == (0, None)


def test_damaged_bundles_and_entries_are_skipped_naming_them_and_the_rest_restored(tmp_path):
    url = str(tmp_path / "run" / FOLDER)
    good = {A: _entry(32)}
    storage.write_json(storage.join(url, "good.json"), {"entries": good, "sha256": digest(good)})
    changed = {B: _entry(64)}
    storage.write_json(storage.join(url, "changed.json"), {"entries": {B: _entry(16)}, "sha256": digest(changed)})
    storage.write_bytes(storage.join(url, "cut.json"), json.dumps({"entries": good, "sha256": digest(good)})[:40].encode())
    odd = {"../../outside.autotune.json": _entry(8), C: "not json {", f"{C}.cubin": "x"}
    storage.write_json(storage.join(url, "odd.json"), {"entries": odd, "sha256": digest(odd)})
    warnings = []
    cache = KernelCache(url, str(tmp_path / "cache"), warn=warnings.append)
    assert cache.restore() == 1
    assert local_entries(cache.cache_dir) == good and not (tmp_path / "outside.autotune.json").exists()
    text = "\n".join(warnings)
    assert f"{url}/changed.json: its entries do not match its sha256" in text
    assert f"skipped the bundle {url}/cut.json" in text
    assert f"skipped the entry '../../outside.autotune.json' of {url}/odd.json: not a Triton autotune entry" in text
    assert f"skipped the entry {C} of {url}/odd.json: its text is not JSON" in text
    assert f"skipped the entry '{C}.cubin'" in text
    assert len(warnings) == 5, warnings


def test_the_cache_folder_follows_tritons_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    assert triton_cache_dir() == str(tmp_path / ".triton" / "cache")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert triton_cache_dir() == str(tmp_path / "elsewhere")
    try:
        from triton import knobs
    except ImportError:
        return
    assert knobs.cache.dir == str(tmp_path / "elsewhere")


def test_a_training_job_shares_tuning_under_its_run_root(tmp_path):
    import logging

    from pipeline.config import load_config
    from pipeline.stages import StageContext
    from pipeline.train.job import make_job

    config = load_config("configs/tiny.yaml", [])
    ctx = StageContext(name="stage2", config=config, output=f"{config.run.root}/stage2/attempt-0001",
                       inputs={"data": f"{config.run.root}/data"}, log=logging.getLogger("test"))
    job = make_job(ctx, f"{config.run.root}/stage1b/attempt-0001/export")
    assert job.kernel_cache == storage.join(config.run.root, FOLDER)
    job.dump(str(tmp_path / "job.json"))  # the file the workers read
    assert type(job).load(str(tmp_path / "job.json")).kernel_cache == job.kernel_cache


def test_the_command_fills_a_cache_from_a_run_root(tmp_path, capsys):
    from pipeline.kernel_cache import main

    root = tmp_path / "run"
    entries = {A: _entry(32), C: _entry(16)}
    storage.write_json(storage.join(str(root), FOLDER, "stage2-node.json"), {"entries": entries, "sha256": digest(entries)})
    assert main([str(root), "--into", str(tmp_path / "cache")]) == 2
    assert local_entries(str(tmp_path / "cache")) == entries
    assert "2 tuned kernel configurations" in capsys.readouterr().out


def test_the_command_loads_a_runs_compiled_kernels_when_asked(tmp_path, capsys, monkeypatch):
    from pipeline import kernel_cache

    root = str(tmp_path / "run")
    url = KernelCache(storage.join(root, FOLDER), str(tmp_path / "t")).compiled_url
    storage.write_bytes(storage.join(url, "stage2-a.bin"), kernel_cache.pack_compiled(b"one", {"inductor:x", "pgo:y"}))
    storage.write_bytes(storage.join(url, "stage3-b.bin"), kernel_cache.pack_compiled(b"two", {"inductor:x", "inductor:z"}))
    loads = []
    monkeypatch.setattr("torch.compiler.load_cache_artifacts", lambda b: loads.append(b) or object())
    node = KernelCache(storage.join(root, FOLDER), str(tmp_path / "node1"))
    _compiled(monkeypatch, tmp_path / "node1", K1, "chunk_fwd_kernel_o", b"\x7fELF")
    assert node.publish_kernels()[0] == 1
    kernel_cache.main([root, "--into", str(tmp_path / "cache")])
    assert loads == [] and "compiled" not in capsys.readouterr().out
    assert _found_by_triton(monkeypatch, tmp_path / "cache", K1, "chunk_fwd_kernel_o") is None
    kernel_cache.main([root, "--into", str(tmp_path / "cache"), "--compiled"])
    out = capsys.readouterr().out
    assert loads == [b"one", b"two"] and "3 compiled artifacts" in out  # distinct keys
    assert "1 compiled Triton kernels" in out and _found_by_triton(monkeypatch, tmp_path / "cache", K1,
                                                                   "chunk_fwd_kernel_o") is not None


def test_a_block_of_gpu_work_starts_from_the_shared_tuning_and_publishes_its_own_even_when_it_fails(tmp_path,
                                                                                                   monkeypatch):
    from pipeline.kernel_cache import shared_tuning

    root, cache = str(tmp_path / "run"), tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    entries = {A: _entry(32)}
    storage.write_json(storage.join(root, FOLDER, "stage3-node.json"), {"entries": entries, "sha256": digest(entries)})
    lines = []
    with pytest.raises(RuntimeError, match="out of memory"):
        with shared_tuning(root, "eval-checkpoint", lines.append):
            assert local_entries(str(cache)) == entries  # restored before the work
            _write(str(cache), B, _entry(64))            # tuned by the work
            raise RuntimeError("CUDA out of memory")
    assert [sorted(b["entries"]) for b in _bundles(storage.join(root, FOLDER))] in ([[A], [B]], [[B], [A]])
    assert lines[0].startswith("eval-checkpoint: 1 tuned kernel configurations from the run root")
    assert lines[1].startswith("eval-checkpoint: 1 tuned kernel configurations of this node that the run root lacked")


# -- torch.compile's artifacts ------------------------------------------------------------------------------------
# one process of a node: loads the run root's compiled bundles, compiles, prints torch's cache counters, publishes
_NODE = """
import json, sys
import torch
from torch._dynamo.utils import counters
from pipeline.kernel_cache import KernelCache
cache = KernelCache(sys.argv[1], name=sys.argv[2], warn=print)
loaded = cache.restore_compiled()
torch.compile(lambda x: (x.sin() * 3).cumsum(0))(torch.randn(64))
if sys.argv[3] == "two":
    torch.compile(lambda x: x.cos().amax())(torch.randn(64))
published, url = cache.publish_compiled()
print(json.dumps({"loaded": loaded, "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "published": published}))
"""


def _node(url, tmp_path, node, name, graphs):
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / node / "inductor"),
           "TRITON_CACHE_DIR": str(tmp_path / node / "triton")}
    out = subprocess.run([sys.executable, "-c", _NODE, url, name, graphs], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fresh_node_loads_what_another_compiled_and_compiles_only_what_is_new(tmp_path):
    url = str(tmp_path / "run" / FOLDER)
    first = _node(url, tmp_path, "node1", "stage2", "one")
    assert first == {"loaded": 0, "hits": 0, "misses": 1, "published": first["published"]} and first["published"] >= 1
    # a fresh node (empty compile caches): the graph node1 compiled is a hit in torch's own cache, the new one a miss
    second = _node(url, tmp_path, "node2", "stage3", "two")
    assert second["loaded"] == first["published"] and second["hits"] == 1 and second["misses"] == 1
    assert second["published"] >= 1
    # a third process that compiles nothing new publishes nothing
    third = _node(url, tmp_path, "node3", "eval", "two")
    assert third["hits"] == 2 and third["misses"] == 0 and third["published"] == 0
    bundles = storage.list_files(KernelCache(url, str(tmp_path / "t")).compiled_url, suffix=".bin")
    assert len(bundles) == 2 and [os.path.basename(b).split("-")[0] for b in bundles].count("stage2") == 1


def test_damaged_or_foreign_compiled_bundles_are_skipped_naming_them(tmp_path, monkeypatch):
    from pipeline import kernel_cache

    url = str(tmp_path / "run" / FOLDER)
    cache = KernelCache(url, str(tmp_path / "t"))
    good = kernel_cache.pack_compiled(b"payload bytes", {"inductor:abc"})
    storage.write_bytes(storage.join(cache.compiled_url, "stage2-a.bin"), good[:-1] + b"X")   # a flipped byte
    storage.write_bytes(storage.join(cache.compiled_url, "stage2-b.bin"), b"not a header\n" + b"x")
    other = storage.join(url, kernel_cache.COMPILED, "torch0.0.0-sm00", "stage2-c.bin")    # another torch/device
    storage.write_bytes(other, good)
    loads = []
    monkeypatch.setattr("torch.compiler.load_cache_artifacts", lambda b: loads.append(b) or object())
    warnings = []
    cache = KernelCache(url, str(tmp_path / "t"), warn=warnings.append)
    assert cache.restore_compiled() == 0 and loads == []
    assert len(warnings) == 2
    assert "stage2-a.bin" in warnings[0] and "does not match its sha256" in warnings[0]
    assert "stage2-b.bin" in warnings[1] and "not a bundle header" in warnings[1]
    # what a node compiled is published only when it holds a key no readable bundle holds
    storage.write_bytes(storage.join(cache.compiled_url, "stage2-d.bin"), good)
    publisher = KernelCache(url, str(tmp_path / "t"), warn=warnings.append)
    monkeypatch.setattr(kernel_cache, "compiled_artifacts", lambda: (b"payload bytes", {"inductor:abc"}))
    assert publisher.publish_compiled() == (0, None)
    monkeypatch.setattr(kernel_cache, "compiled_artifacts", lambda: (b"more", {"inductor:abc", "pgo:def"}))
    count, written = publisher.publish_compiled()
    assert count == 1 and kernel_cache.unpack_compiled(storage.read_bytes(written)) == ({"inductor:abc", "pgo:def"},
                                                                                         b"more")
    # where the run root's writers are not trusted to run code on the nodes, no pickle is loaded nor written
    monkeypatch.setenv("INFINITEVL_SHARE_COMPILED", "0")
    assert KernelCache(url, str(tmp_path / "t")).restore_compiled() == 0 and loads == []
    monkeypatch.setattr(kernel_cache, "compiled_artifacts", lambda: (b"new", {"inductor:new"}))
    assert KernelCache(url, str(tmp_path / "t")).publish_compiled() == (0, None)
    monkeypatch.delenv("INFINITEVL_SHARE_COMPILED")
    # it compiles more: its new bundle holds all of it and replaces its older one
    monkeypatch.setattr(kernel_cache, "compiled_artifacts", lambda: (b"most", {"inductor:abc", "pgo:def", "pgo:g"}))
    count, latest = publisher.publish_compiled()
    assert count == 1 and not storage.exists(written) and storage.exists(latest)


# -- Triton's compiled kernels --------------------------------------------------------------------------------------
# written and read back by Triton's own cache manager, as triton.compile does: the files, then the group naming them
K1 = "5MDQXFRPGOFDGBG6SJZP4TVGLVXEYRXTYLHGHJRW4Y3IKP5HP6EQ"
K2 = "ZUMX2GOQWAHN4VWEVJJS2ML7MEH3CYDEPLBJT6RRCP7Z3F45ZVVA"
K3 = "4CIGMQYZK7XWNYKCOWAYZ6K6TEOHIUEOGDZEY2C6NXEI5JVNMWTQ"


def _compiled(monkeypatch, cache, key, kernel, binary: bytes, forms=("ttir", "ptx")):
    """A kernel in `cache` as triton.compile leaves it (intermediate forms, binary, metadata, then the group)."""
    from triton.runtime.cache import FileCacheManager

    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    manager = FileCacheManager(key)
    group = {f"{kernel}.{form}": manager.put(f"// {form} of {kernel}", f"{kernel}.{form}") for form in forms}
    group[f"{kernel}.cubin"] = manager.put(binary, f"{kernel}.cubin")
    group[f"{kernel}.json"] = manager.put(json.dumps({"name": kernel, "hash": key, "num_warps": 4}), f"{kernel}.json")
    manager.put_group(f"{kernel}.json", group)


def _found_by_triton(monkeypatch, cache, key, kernel) -> dict | None:
    """{file name: bytes} of the kernel as Triton's cache lookup finds it (None: Triton would compile it again)."""
    from triton.runtime.cache import FileCacheManager

    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    group = FileCacheManager(key).get_group(f"{kernel}.json")
    if group is None:
        return None
    assert all(path.startswith(str(cache)) for path in group.values()), group  # this node's files, not another's
    return {name: open(path, "rb").read() for name, path in group.items()}


def test_a_fresh_node_takes_the_triton_kernels_another_compiled_whole(tmp_path, monkeypatch):
    from pipeline import kernel_cache

    url = str(tmp_path / "run" / FOLDER)
    one, two = tmp_path / "node1", tmp_path / "node2"
    _compiled(monkeypatch, one, K3, "l2norm_fwd_kernel", b"\x7fELF old")  # in the cache before the stage: stays here
    first = KernelCache(url, str(one), name="stage1a")
    _compiled(monkeypatch, one, K1, "chunk_fwd_kernel_o", b"\x7fELF\x00o")  # compiled while the stage runs
    _compiled(monkeypatch, one, K2, "chunk_gated_delta_rule_fwd_kernel_h", b"\x7fELF\x00h")
    count, written = first.publish_kernels()
    assert count == 2 and written.startswith(first.kernels_url)
    keys, payload = kernel_cache.unpack_compiled(storage.read_bytes(written))
    assert keys == {f"{K1}/chunk_fwd_kernel_o", f"{K2}/chunk_gated_delta_rule_fwd_kernel_h"}
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(payload)) as tar:  # metadata and binary only: a launch reads no more
        assert sorted(tar.getnames()) == [f"{K1}/chunk_fwd_kernel_o.cubin", f"{K1}/chunk_fwd_kernel_o.json",
                                          f"{K2}/chunk_gated_delta_rule_fwd_kernel_h.cubin",
                                          f"{K2}/chunk_gated_delta_rule_fwd_kernel_h.json"]
    assert first.publish_kernels() == (0, None)

    assert _found_by_triton(monkeypatch, two, K1, "chunk_fwd_kernel_o") is None
    second = KernelCache(url, str(two), name="stage1b")
    assert second.restore_kernels() == 2
    found = _found_by_triton(monkeypatch, two, K1, "chunk_fwd_kernel_o")
    assert found["chunk_fwd_kernel_o.cubin"] == b"\x7fELF\x00o" and set(found) == {"chunk_fwd_kernel_o.cubin",
                                                                                 "chunk_fwd_kernel_o.json"}
    assert _found_by_triton(monkeypatch, two, K2, "chunk_gated_delta_rule_fwd_kernel_h") is not None
    assert _found_by_triton(monkeypatch, two, K3, "l2norm_fwd_kernel") is None
    assert second.restore_kernels() == 0 and second.publish_kernels() == (0, None)  # nothing new either way
    _compiled(monkeypatch, two, K3, "l2norm_fwd_kernel", b"\x7fELF new")  # compiled on node 2: its own bundle
    assert second.publish_kernels()[0] == 1
    third = KernelCache(url, str(tmp_path / "node3"))
    assert third.restore_kernels() == 3
    assert _found_by_triton(monkeypatch, tmp_path / "node3", K3, "l2norm_fwd_kernel")["l2norm_fwd_kernel.cubin"] == \
        b"\x7fELF new"


def test_damaged_triton_kernel_bundles_are_skipped_naming_them_and_the_rest_restored(tmp_path, monkeypatch):
    import io
    import tarfile

    from pipeline import kernel_cache

    url = str(tmp_path / "run" / FOLDER)
    folder = KernelCache(url, str(tmp_path / "t")).kernels_url

    def tar(files: dict[str, bytes]) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w:gz") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return out.getvalue()

    meta = json.dumps({"name": "k"}).encode()
    good = {f"{K1}/k.json": meta, f"{K1}/k.cubin": b"\x7fELF"}
    mixed = {**good, "../../escape.cubin": b"x", f"{K2}/k.json": meta,                       # K2: no binary
             f"{K3}/k.json": b"{not json", f"{K3}/k.cubin": b"\x7fELF"}                        # K3: bad metadata
    storage.write_bytes(storage.join(folder, "stage1a-a.bin"), kernel_cache.pack_compiled(tar(mixed), {"x"}))
    flipped = kernel_cache.pack_compiled(tar(good), {"y"})
    storage.write_bytes(storage.join(folder, "stage1a-b.bin"), flipped[:-1] + bytes([flipped[-1] ^ 1]))
    storage.write_bytes(storage.join(folder, "stage1a-c.bin"), kernel_cache.pack_compiled(b"not a tar", {"z"}))
    warnings = []
    cache = KernelCache(url, str(tmp_path / "node"), warn=warnings.append)
    assert cache.restore_kernels() == 1
    assert _found_by_triton(monkeypatch, tmp_path / "node", K1, "k") == {"k.json": meta, "k.cubin": b"\x7fELF"}
    assert not (tmp_path / "escape.cubin").exists() and not os.path.exists(tmp_path / "node" / K3)
    text = "\n".join(warnings)
    assert "'../../escape.cubin': not a Triton kernel's metadata or binary" in text
    assert f"{K2}/k: no binary" in text and f"{K3}/k: its metadata is missing or not JSON" in text
    assert "stage1a-b.bin" in text and "does not match its sha256" in text
    assert "stage1a-c.bin" in text and "not a gzipped tar" in text
    # where the run root's writers are not trusted to run code on the nodes, no binary travels
    monkeypatch.setenv("INFINITEVL_SHARE_COMPILED", "0")
    assert KernelCache(url, str(tmp_path / "node4")).restore_kernels() == 0
    off = KernelCache(url, str(tmp_path / "node5"))
    _compiled(monkeypatch, tmp_path / "node5", K2, "k2", b"\x7fELF")
    assert off.publish_kernels() == (0, None)


# a node's process on a GPU: restores the run root's Triton kernels, launches one (Triton says whether it compiled
# it or found it in its cache), publishes what it compiled
_TRITON_NODE = '''
import json, sys
import torch, triton
import triton.language as tl
from triton import knobs
from pipeline.kernel_cache import KernelCache

@triton.jit
def add_one(x_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

hits = []
knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
cache = KernelCache(sys.argv[1], name=sys.argv[2], warn=print)
restored = cache.restore_kernels()
x = torch.zeros(1000, device="cuda")
add_one[(8,)](x, 1000, BLOCK=128)
print(json.dumps({"restored": restored, "cache_hits": hits, "sum": float(x.sum()),
                  "published": cache.publish_kernels()[0]}))
'''


@pytest.mark.gpu
def test_a_fresh_gpu_node_launches_the_kernel_another_compiled_without_compiling_it(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "node.py"
    script.write_text(_TRITON_NODE)
    url = str(tmp_path / "run" / FOLDER)

    def node(name):
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / name / "triton")}
        out = subprocess.run([sys.executable, str(script), url, name], env=env, capture_output=True, text=True,
                             timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = node("node1")
    assert first == {"restored": 0, "cache_hits": [False], "sum": 1000.0, "published": 1}
    second = node("node2")  # an empty Triton cache: Triton takes the kernel node1 compiled from its cache
    assert second == {"restored": 1, "cache_hits": [True], "sum": 1000.0, "published": 0}
