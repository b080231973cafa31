"""tests/transformers_tree.py: transformers' test files import each other relatively (`from ..x import`) and, in
later releases, by the absolute name `tests.` (`from tests.exporters.test_export import ...`), which inside our
suite names our own tests/ package. Both are followed when the tree is fetched and both resolve when it loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests import transformers_tree

ROOT = Path(__file__).resolve().parents[1]


def test_fetching_follows_relative_and_absolute_tests_imports():
    text = textwrap.dedent("""
        import os
        from transformers import GenerationConfig
        from ..test_modeling_common import floats_tensor
        from .helpers import h
        from tests.exporters.test_export import ExportGenerateTesterMixin
        from tests.utils.deep.mod import thing
    """)
    assert sorted(transformers_tree._relative_imports("generation/test_utils.py", text)) == [
        "exporters/test_export.py", "generation/helpers.py", "test_modeling_common.py", "utils/deep/mod.py"]


def test_a_tree_whose_files_import_tests_dot_loads_beside_our_tests_package(tmp_path):
    tree = tmp_path / "tests"
    for folder in (tree, tree / "generation", tree / "exporters"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text("")
    (tree / "exporters" / "test_export.py").write_text("class ExportGenerateTesterMixin:\n    marker = 'theirs'\n")
    (tree / "generation" / "test_utils.py").write_text(
        "from tests.exporters.test_export import ExportGenerateTesterMixin\n"
        "from ..exporters import test_export\n"
        "class GenerationTesterMixin(ExportGenerateTesterMixin):\n    pass\n")
    script = textwrap.dedent(f"""
        from pathlib import Path
        from tests import transformers_tree
        import tests.helpers  # ours still resolves to ours
        tree = transformers_tree.Tree(Path({str(tree)!r}), "test", ())
        mixin = transformers_tree.load(tree, "generation.test_utils").GenerationTesterMixin
        import sys
        assert mixin.marker == "theirs", mixin.marker
        # one module, not two copies: the alias is the tree's own
        assert sys.modules["tests.exporters.test_export"] is sys.modules["transformers_tests.exporters.test_export"]
        assert tests.helpers.__file__.startswith({str(ROOT / "tests")!r}), tests.helpers.__file__
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
