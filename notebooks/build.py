"""
Build the notebooks from their `py:percent` sources, executed, outputs included.

    python notebooks/build.py                 # every NN_*.py -> NN_*.ipynb, full setting (a CPU-minute each)
    python notebooks/build.py 01_relora       # one notebook
    FAST=1 python notebooks/build.py          # the seconds-long setting the tests use

The `.py` file is the source a reviewer reads and diffs (cells start at `# %%`, Markdown cells at
`# %% [markdown]` with every line commented); the `.ipynb` is what GitHub renders. The tests
(tests/test_notebooks.py) execute every notebook with FAST=1 and check the two agree.
"""

import os
import sys

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_percent(text):
    """`# %%` script -> list of (cell_type, source)."""
    cells, kind, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, lines))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line[2:] if kind == "markdown" and line.startswith("# ") else
                         "" if kind == "markdown" and line == "#" else line)
    if kind is not None:
        cells.append((kind, lines))
    out = []
    for kind, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        out.append((kind, "\n".join(lines)))
    return out


def to_notebook(py_path):
    with open(py_path) as fh:
        cells = parse_percent(fh.read())
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    return nb


def execute(nb, timeout=900):
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
    return nb


def main(names):
    sources = sorted(f for f in os.listdir(HERE) if f[:2].isdigit() and f.endswith(".py"))
    if names:
        sources = [f for f in sources if f[:-3] in names or f[:2] in names]
    for src in sources:
        print(f"building {src} (FAST={os.environ.get('FAST', '0')})", flush=True)
        nb = execute(to_notebook(os.path.join(HERE, src)))
        nbformat.write(nb, os.path.join(HERE, src[:-3] + ".ipynb"))


if __name__ == "__main__":
    main(sys.argv[1:])
