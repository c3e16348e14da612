"""gradflow: see where learning happens in a PyTorch network.

Architecture: data flows one way, library → analyses → CLI (``tests/test_architecture.py`` checks it)::

    model, optimizer ──hooks──▶ Recorder (recorder.py) ──per-tensor figures──▶ quantities.py
    quantities.py ──per-layer rows──▶ store.py: Zarr, every variable declared in schema.py
    store ──gradflow.open──▶ xarray ──▶ analyses/: figures, tables, the report (functions of xarray)
    train.py, sweep.py: the paper's experiments (options: TrainConfig) drive the Recorder; bench/ measures it
    gradflow/cli/: the commands; the only place that wires analyses in and draws progress

The library (``gradflow/`` but ``gradflow/cli/``) never imports analyses, the CLI, rich or typer; its
long-running functions take plain progress callbacks. ``analyses/`` (installed as ``gradflow.analyses``)
imports only public library modules. Where a change goes: a recorded figure → schema.py plus its computation in quantities.py;
a figure or table → one file in analyses/; a command → one file in gradflow/cli/; a benchmark →
one module in gradflow/bench/.

Public API (kept deliberately tiny)::

    rec = gradflow.Recorder(model, optimizer, "run.zarr", every=1)
    ...                      # your own loop: zero_grad / backward / optimizer.step()
    rec.end_epoch(train_loss=..., val_loss=...)
    rec.close()
    ds = gradflow.open("run.zarr")                  # xarray.Dataset, dims (step, layer)
    ep = gradflow.open("run.zarr", group="epochs")  # xarray.Dataset, dims (epoch, layer)
    tree = gradflow.open_tree("run.zarr")           # both from one commit (xarray.DataTree)
"""

import os as _os

from gradflow.errors import GradflowError
from gradflow.recorder import Recorder
from gradflow.store import open, open_tree

# gradflow.analyses lives in the top-level analyses/ folder, which an install maps into the package
# (pyproject.toml). Run from a source checkout without installing it (PYTHONPATH=<checkout>), find it there.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "analyses")) and _os.path.isfile(
        _os.path.join(_checkout, "analyses", "__init__.py")):
    __path__.append(_checkout)

__version__ = "0.1.0"
__all__ = ["Recorder", "open", "open_tree", "GradflowError", "__version__"]
