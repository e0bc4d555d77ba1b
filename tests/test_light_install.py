"""The light install (``pip install -e .``, no PyTorch): the package never imports torch.

Statically, the only ``import torch`` in ``spry_jax/`` is the opt-in reader of pickled
``pytorch_model.bin`` checkpoints (``from_pretrained(..., allow_pickle=True)``). Dynamically, a
process in which torch cannot be found -- every import finder answers "no such module" for
``torch``, as in a virtual environment without it; transformers and datasets then see no torch
either -- imports every module of the package and runs the smoke experiment end to end.
"""

import ast
import os
import subprocess
import sys

from tests.xla_flags import with_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, enclosing function) of every allowed torch import.
ALLOWED = {("spry_jax/models/loading.py", "iter_checkpoint")}

_NO_TORCH = r"""
import importlib.abc, sys

class _Hide(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, name):  # find_distributions, invalidate_caches, ...
        return getattr(self.inner, name)

sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
try:
    import torch  # noqa: F401
    raise SystemExit("torch is still importable")
except ModuleNotFoundError:
    pass

import importlib, pkgutil
import spry_jax
names = [m.name for m in pkgutil.walk_packages(spry_jax.__path__, "spry_jax.")]
for name in names:
    if name.endswith("__main__"):
        continue
    importlib.import_module(name)

import transformers
assert not transformers.utils.is_torch_available()
from spry_jax import config as config_lib, train
sys.path.insert(0, "experiments")
import smoke
c = smoke.get_config()
c.rounds = 1
c.log_memory = False
summary = train.train_and_evaluate(c, sys.argv[1])
assert summary["rounds"] == 1, summary
print("OK", len(names), "modules;", "torch" in sys.modules)
"""


def _torch_imports(path: str) -> set[tuple[str, str]]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    found = set()

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            here = child.name if isinstance(child, (ast.FunctionDef, ast.ClassDef)) else where
            mods = []
            if isinstance(child, ast.Import):
                mods = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module:
                mods = [child.module]
            if any(m == "torch" or m.startswith("torch.") for m in mods):
                found.add((os.path.relpath(path, ROOT), where))
            visit(child, here)

    visit(tree, "<module>")
    return found


def test_only_the_opt_in_pickle_reader_imports_torch():
    found = set()
    for d, _, files in os.walk(os.path.join(ROOT, "spry_jax")):
        for f in files:
            if f.endswith(".py"):
                found |= _torch_imports(os.path.join(d, f))
    assert found == ALLOWED


def test_package_imports_and_runs_the_smoke_experiment_without_torch(tmp_path):
    env = {**os.environ, "XLA_FLAGS": with_fast_compile()}
    out = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("OK") and last.endswith("False"), last
    assert os.path.exists(tmp_path / "summary.json")
