"""notebooks/sizing_a_run.ipynb runs from top to bottom without an error, in a fresh kernel, and
its saved outputs are those of the code it holds (the paper's numbers among them)."""
import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "sizing_a_run.ipynb"


def text_outputs(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow  # starts a kernel and counts the FLOPs of two networks: about 10 s
def test_the_sizing_notebook_runs_and_gives_the_papers_numbers():
    import nbclient  # requirements-dev.txt: nbclient, nbformat, ipykernel
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # "python3" is the kernel ipykernel provides wherever it is installed (CI included).
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    out = text_outputs(nb)
    assert "L=76            22.5%             9.0%            34.8%            17.8%" in out
    assert " 0.8     9.0%   17.8%" in out and " 0.1    40.5%   44.9%" in out  # the paper's table
    assert "did you mean the depth L=76? Its layers per block would be 12" in out
    assert "ResNet-18,  cubic, t_0=0.8:" in out and "cubic t_0 for 20% saved:" in out
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_the_notebook_is_saved_with_its_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c["execution_count"] is not None for c in code)
    assert all(c["outputs"] for c in code[1:])  # every cell but the imports shows something
    assert not any(o.get("output_type") == "error" for c in code for o in c["outputs"])
