"""Every notebook executes offline in FAST mode, and its committed .ipynb matches its .py source."""

import importlib.util
import os

import nbformat
import pytest

from conftest import ROOT

NB_DIR = os.path.join(ROOT, "notebooks")
spec = importlib.util.spec_from_file_location("nb_build", os.path.join(NB_DIR, "build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
SOURCES = sorted(f[:-3] for f in os.listdir(NB_DIR) if f[:2].isdigit() and f.endswith(".py"))


@pytest.mark.parametrize("name", SOURCES)
def test_committed_notebook_matches_its_source(name):
    path = os.path.join(NB_DIR, name + ".ipynb")
    assert os.path.isfile(path), f"{name}.ipynb is missing: run python notebooks/build.py {name}"
    committed = nbformat.read(path, as_version=4)
    fresh = build.to_notebook(os.path.join(NB_DIR, name + ".py"))
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in fresh.cells], \
        f"{name}.ipynb is stale: run python notebooks/build.py {name}"
    errors = [o for c in committed.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors and any(c.get("outputs") for c in committed.cells), "commit the notebook executed, without errors"


@pytest.mark.parametrize("name", SOURCES)
def test_notebook_executes_in_fast_mode(name, monkeypatch):
    monkeypatch.setenv("FAST", "1")
    nb = build.execute(build.to_notebook(os.path.join(NB_DIR, name + ".py")), timeout=300)
    assert all(o.get("output_type") != "error" for c in nb.cells for o in c.get("outputs", []))
