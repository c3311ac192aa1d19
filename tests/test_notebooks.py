"""The tutorial notebooks: stored without outputs, in sync with their build script, and
executable top to bottom on a CPU with the fast settings (``ORTHO_OPTAX_NB_FAST=1``).

Each notebook runs in its own Jupyter kernel (nbclient + ipykernel, the interpreter running
the tests); a cell that raises fails the test, and every notebook must produce at least one
plot (an ``image/png`` output). With fast settings each notebook takes well under a minute
on 2 CPU cores (the four together about 2 minutes, or about 1 minute with ``-n 2``).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_orthogonality.ipynb",
            "03_optimizer_comparison.ipynb", "04_kernels.ipynb"]
MAX_BYTES = 100_000
CELL_TIMEOUT_S = 300

nbformat = pytest.importorskip("nbformat")


def _build_module():
  spec = importlib.util.spec_from_file_location(
      "ortho_optax_build_notebooks", NOTEBOOK_DIR / "build_notebooks.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_expected_notebooks_exist():
  assert NOTEBOOKS == EXPECTED


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_and_small(name):
  path = NOTEBOOK_DIR / name
  assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes"
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert code_cells
  for cell in code_cells:
    assert cell.outputs == [], f"{name}: a code cell has stored outputs (strip them)"
    assert cell.execution_count is None, f"{name}: a code cell has an execution count"
  # The first code cell is the settings cell the tests rely on.
  assert "ORTHO_OPTAX_NB_FAST" in code_cells[0].source


def test_notebooks_match_build_script():
  build = _build_module()
  assert sorted(build.NOTEBOOKS) == EXPECTED
  for name in EXPECTED:
    stored = (NOTEBOOK_DIR / name).read_text()
    assert stored == build.render(name), (
        f"{name} differs from notebooks/build_notebooks.py: run "
        "`python notebooks/build_notebooks.py`")


def test_peers_anchors_json_has_its_source():
  path = NOTEBOOK_DIR.parent / "benchmarks" / "results" / "peers_anchors.json"
  payload = json.loads(path.read_text())
  assert "H100" in payload["source"]
  cols = payload["columns"]
  assert {"xla_bf16_aol4", "triton_turbo_aol4"} <= set(cols)
  for row in payload["rows"]:
    assert len(row["shape"]) == 3
    assert set(row["ms"]) == set(cols)
    assert all(v is None or v > 0 for v in row["ms"].values())


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
  """A kernel spec for the interpreter running the tests (independent of user kernels)."""
  pytest.importorskip("nbclient")
  kernelspec = pytest.importorskip("ipykernel.kernelspec")
  root = tmp_path_factory.mktemp("jupyter")
  name = "ortho-optax-test"
  kernelspec.write_kernel_spec(path=str(root / "kernels" / name))
  spec_file = root / "kernels" / name / "kernel.json"
  spec = json.loads(spec_file.read_text())
  spec["argv"][0] = sys.executable
  spec["display_name"] = name
  spec_file.write_text(json.dumps(spec))
  mp = pytest.MonkeyPatch()
  mp.setenv("JUPYTER_PATH", str(root))
  yield name
  mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_with_fast_settings(name, kernel_name, monkeypatch):
  import nbclient  # pylint: disable=import-outside-toplevel

  monkeypatch.setenv("ORTHO_OPTAX_NB_FAST", "1")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # The test session's 8 fake host devices (conftest) only slow compilation down here; its
  # LLVM optimisation level (0) is kept.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S, allow_errors=False,
      resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  # independent: the kernel gets its own session, so the signals jupyter_client sends to
  # the kernel's process group on shutdown never reach this pytest process.
  client.execute(independent=True)  # raises CellExecutionError on the first failing cell

  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type in ("display_data", "execute_result")
            and "image/png" in o.get("data", {})]
  assert images, f"{name} produced no plot (no image/png output)"
