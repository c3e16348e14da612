"""gradflow: see where learning happens in a PyTorch network.

Public API (kept deliberately tiny)::

    rec = gradflow.Recorder(model, optimizer, "run.zarr", every=1)
    ...                      # your own loop: zero_grad / backward / optimizer.step()
    rec.end_epoch(train_loss=..., val_loss=...)
    rec.close()
    ds = gradflow.open("run.zarr")                  # xarray.Dataset, dims (step, layer)
    ep = gradflow.open("run.zarr", group="epochs")  # xarray.Dataset, dims (epoch, layer)
    tree = gradflow.open_tree("run.zarr")           # both from one commit (xarray.DataTree)
"""

from gradflow.errors import GradflowError
from gradflow.recorder import Recorder
from gradflow.store import open, open_tree

__version__ = "0.1.0"
__all__ = ["Recorder", "open", "open_tree", "GradflowError", "__version__"]
