"""transformers' own test files for the installed version, found or fetched at test time (never kept in the repo).

Where they come from, first found first:
1. `INFINITEVL_TRANSFORMERS_TESTS`: a checkout of transformers at the installed version's tag (its root or its
   tests/ folder): every mixin runs, the generation ones included.
2. A cache folder (`INFINITEVL_CACHE`, default ~/.cache/infinitevl, then transformers-tests/<version>/) filled
   on first use: the installed version's source release from the package index (`pip download`), which holds
   tests/test_modeling_common.py, then, where the source repository can be reached, the files it imports that
   the release leaves out (tests/generation/test_utils.py, tests/exporters/test_export.py and what they import),
   at the version's tag. Where they cannot be reached, the folder gets two empty classes in their place, marked
   as such: ModelTesterMixin runs, and the GenerationTesterMixin and export tests are reported as not run.

The tree is imported as a package of its own name (`transformers_tests`), since ours is `tests` too.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import transformers

ENV = "INFINITEVL_TRANSFORMERS_TESTS"
PACKAGE = "transformers_tests"
SOURCE = "https://raw.githubusercontent.com/huggingface/transformers/v{version}/tests/{path}"
STAND_IN = "# infinitevl stand-in: {path} is not in transformers' source release and its repository was not reachable\n"
# what test_modeling_common imports beside itself
NEEDED = ("generation/test_utils.py", "exporters/test_export.py")


@dataclass
class Tree:
    path: Path
    origin: str
    missing: tuple[str, ...]  # files stood in for: their mixins do not run

    @property
    def has_generation_tests(self) -> bool:
        return "generation/test_utils.py" not in self.missing


def version() -> str:
    return transformers.__version__


def find() -> tuple[Tree | None, str]:
    """(the tree, "") or (None, why there is none)."""
    given = os.environ.get(ENV)
    if given:
        root = Path(given)
        tests = root / "tests" if (root / "tests" / "test_modeling_common.py").exists() else root
        if not (tests / "test_modeling_common.py").exists():
            return None, f"{ENV}={given} holds no test_modeling_common.py (give a transformers checkout or its tests/)"
        return Tree(tests, f"{ENV}={given}", _stood_in(tests)), ""
    cache = Path(os.environ.get("INFINITEVL_CACHE", Path.home() / ".cache" / "infinitevl")) / "transformers-tests" / \
        version()
    if not (cache / "test_modeling_common.py").exists():
        why = _fill(cache)
        if why:
            return None, why
    return Tree(cache, f"transformers {version()} source release (+ its repository's tag where reachable), "
                       f"cached in {cache}", _stood_in(cache)), ""


def _stood_in(tests: Path) -> tuple[str, ...]:
    """The NEEDED files of a tree that are our stand-ins (a filled cache copied elsewhere keeps them)."""
    marker = STAND_IN.split(":")[0]
    return tuple(p for p in NEEDED if (tests / p).exists() and (tests / p).read_text().startswith(marker))


def _fill(cache: Path) -> str:
    """Fills `cache`; returns "" or why it could not."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--no-build-isolation", "-q", "-d", tmp, f"transformers=={version()}"],
                           check=True, capture_output=True, text=True, timeout=300)
        except (subprocess.SubprocessError, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            return (f"transformers {version()}'s test files are not here: no {ENV}, nothing cached, and its source "
                    f"release could not be downloaded ({detail.strip().splitlines()[-1] if detail.strip() else e})")
        archive = next(Path(tmp).glob("transformers-*.tar.gz"))
        staging = Path(tmp) / "tree"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
            if not members:
                return f"transformers {version()}'s source release has no tests/ folder"
            for m in members:
                target = staging / m.name.split("/tests/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        _fetch_missing(staging)
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            (folder / "__init__.py").touch()
        cache.parent.mkdir(parents=True, exist_ok=True)
        if cache.exists():
            shutil.rmtree(cache)
        shutil.copytree(staging, cache)
    return ""


def _fetch_missing(tree: Path) -> None:
    """Downloads NEEDED and the files they import relatively, at the version's tag; a stand-in where unreachable."""
    queue, seen = list(NEEDED), set()
    while queue:
        path = queue.pop()
        if path in seen or (tree / path).exists():
            continue
        seen.add(path)
        try:
            with urllib.request.urlopen(SOURCE.format(version=version(), path=path), timeout=20) as r:
                text = r.read().decode()
        except OSError:
            if path in NEEDED:
                (tree / path).parent.mkdir(parents=True, exist_ok=True)
                name = "GenerationTesterMixin" if "generation" in path else "ExportTesterMixin"
                (tree / path).write_text(STAND_IN.format(path=path) + f"class {name}:\n    pass\n")
            continue
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
        queue.extend(_relative_imports(path, text))


def _relative_imports(path: str, text: str) -> list[str]:
    """The tests/ files `path` imports: relatively (`from .x import`, `from ..y.z import`) or by the tree's
    absolute name (`from tests.exporters.test_export import`, as later releases write)."""
    out = []
    here = Path(path).parent
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.level:
            base = here
            for _ in range(node.level - 1):
                base = base.parent
            out.append(str(base / (node.module.replace(".", "/") + ".py")).lstrip("./"))
        elif node.module.startswith("tests."):
            out.append(node.module[len("tests."):].replace(".", "/") + ".py")
    return out


def load(tree: Tree, module: str):
    """Imports `module` (e.g. "test_modeling_common") of the tree, as part of the package `transformers_tests`."""
    if PACKAGE not in sys.modules:
        init = tree.path / "__init__.py"
        spec = importlib.util.spec_from_file_location(PACKAGE, init if init.exists() else None,
                                                      submodule_search_locations=[str(tree.path)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        if spec.loader is not None:
            spec.loader.exec_module(package)
        sys.meta_path.insert(0, _TreeAlias(tree.path))
    return importlib.import_module(f"{PACKAGE}.{module}")


class _TreeAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`tests.<x>` for a module of the tree that our own tests/ package lacks (later releases import
    `from tests.exporters.test_export import ...`): the tree's `transformers_tests.<x>`, imported once."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("tests."):
            return None
        rest = fullname[len("tests."):].replace(".", "/")
        ours = Path(__file__).parent / rest
        if ours.with_suffix(".py").exists() or ours.is_dir():
            return None
        theirs = self.root / rest
        if not (theirs.with_suffix(".py").exists() or theirs.is_dir()):
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=theirs.is_dir())

    def create_module(self, spec):
        return importlib.import_module(f"{PACKAGE}.{spec.name[len('tests.'):]}")

    def exec_module(self, module):
        pass  # imported whole by create_module
