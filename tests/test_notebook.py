"""notebooks/quickstart.ipynb runs headless, top to bottom, on the tiny model: its cells assert what
they show (a ready job, base and tuned images of the size asked for, a contact sheet)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SKIPPED_TAG = "ui"  # the cell that opens the app inline: nobody would look at it


def test_the_committed_notebook_has_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum(SKIPPED_TAG in c.metadata.get("tags", []) for c in code) == 1


@pytest.mark.skipif(not importlib.util.find_spec("diffusers"), reason="the local engine is not installed")
def test_the_quickstart_runs_headless_on_the_tiny_model(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if SKIPPED_TAG not in c.metadata.get("tags", [])]
    # The kernel inherits this environment: its own data dir, no key (so the local engine), tiny model.
    monkeypatch.setenv("FLUX_STUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    for name in ("COMETAPI_KEY", "FLUX_LOCAL_MODEL", "STUDIO_PHOTOS"):
        monkeypatch.delenv(name, raising=False)
    client = NotebookClient(nb, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # a failing assert in a cell raises CellExecutionError, with the cell and traceback
    texts = ["".join(o.get("text", "") for o in c.outputs) for c in nb.cells if c.cell_type == "code"]
    assert any("8 images; first caption: MUGX" in t for t in texts), texts
    assert any("notebook-mug-v1 ready" in t for t in texts), texts
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the side-by-side pair and the contact sheet, drawn in the notebook
    assert not list(ROOT.glob("notebook-*")) and (tmp_path / "data" / "jobs.sqlite3").is_file()
