"""The package's layering, checked by import-linter against .importlinter (as CI runs it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # `lint-imports` imports nothing of the package: it reads the source, so a scratch copy is checked as is.
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is missing: pip install -r requirements.txt (import-linter)")
    return subprocess.run([exe, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": str(Path(sys.executable).parent)})


def test_the_layers_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, upward", [
    ("s4mc/pseudo_label.py", "from s4mc.engine import loop"),  # the S4MC core reaching for the engine
    ("s4mc/data/loaders.py", "from s4mc.engine.batches import epoch_batches"),  # data reaching for the engine
    ("s4mc/methods/mean_teacher.py", "from s4mc.methods import unimatch"),  # one method importing another
])
def test_an_upward_import_breaks_a_contract(tmp_path, module, upward):
    scratch = tmp_path / "repo"
    shutil.copytree(REPO / "s4mc", scratch / "s4mc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", scratch / ".importlinter")
    target = scratch / module
    # A function-level import counts as much as one at the top of the file.
    target.write_text(target.read_text() + f"\n\ndef _scratch():\n    {upward}\n")
    done = lint_imports(scratch)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and module.removesuffix(".py").replace("/", ".") in done.stdout
