"""What ``gradflow watch`` shows: the store re-read on demand, as a Recorder writes it.

:class:`LiveView` re-opens the store on every :meth:`LiveView.snapshot` (readers see the last
complete flush: the consolidated metadata is the commit point, and ``gradflow.open`` waits out a
commit in progress), rebuilds the interactive figures of :mod:`analyses.html` only when the store
grew, and never fails: a store that does not exist yet, one caught mid-commit, or any read error
keeps the last good figures and says so in ``status``. A crashed writer simply stops the growth;
``status["age_s"]`` (seconds since the last recorded step's wall time) shows it.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from gradflow.analyses.html import CONFIG, figures, figures_json, page
from gradflow.analyses.report import open_tree
from gradflow.analyses.runs import runs
from gradflow.check import decode_error


class LiveView:
    """Snapshots of one store for the live page: ``{"figures": {id: plotly JSON}, "status": {...}}``."""

    def __init__(self, store: str | os.PathLike, bins: int = 200, opened=None) -> None:
        """``opened``: the store already opened (``gradflow.open_tree``), for the first snapshot."""
        self.store, self.bins, self._opened = str(store), bins, opened
        self._lock = threading.Lock()
        self._signature = None
        self._figures = "{}"
        self._status: dict = {"steps": 0, "last_step": None, "epochs": 0, "age_s": None, "error": None}

    def update(self) -> None:
        """Re-read the store: its status, and the figures when it grew (decoding what they show).
        Raises what reading raised (:meth:`snapshot` keeps the last good view instead)."""
        tree = self._opened if self._opened is not None else open_tree(self.store)
        self._opened = None
        step_runs, epoch_runs = runs(tree, "step"), runs(tree, "epoch")
        signature = (tuple((n, ds.sizes["step"]) for n, ds in step_runs.items()),
                     tuple((n, ds.sizes["epoch"]) for n, ds in epoch_runs.items()))
        if signature != self._signature:
            self._figures = figures_json(figures(tree, bins=self.bins))
            self._signature = signature
        last = [int(ds["step"].values[-1]) for ds in step_runs.values() if ds.sizes["step"]]
        walls = [float(ds["wall_time"].values[-1]) for ds in step_runs.values()
                 if ds.sizes["step"] and "wall_time" in ds.coords]
        self._status = {"steps": int(sum(ds.sizes["step"] for ds in step_runs.values())),
                        "last_step": max(last) if last else None,
                        "epochs": int(sum(ds.sizes["epoch"] for ds in epoch_runs.values())),
                        "age_s": round(time.time() - max(walls), 1) if walls else None, "error": None}

    def snapshot(self) -> str:
        """The current view as JSON text (figures rebuilt only when the store changed)."""
        with self._lock:
            try:
                self.update()
            except Exception as err:  # noqa: BLE001 - the view must survive whatever the writer does
                err = decode_error(err, self.store) or err  # a chunk gone bad: what check says
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                self._status = {**self._status, "error": message}
            status = {**self._status, "store": self.store, "time": time.time()}
            return f'{{"figures": {self._figures}, "status": {json.dumps(status, default=_plain)}}}'


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


LIVE_SCRIPT = """
const CONFIG = %(config)s;
const REFRESH_MS = %(refresh_ms)d;
async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("data", {cache: "no-store"});
    const view = await response.json();
    const s = view.status;
    for (const [id, fig] of Object.entries(view.figures)) {
      let div = document.getElementById(id);
      if (!div) { div = document.createElement("div"); div.id = id; div.className = "figure";
                  document.getElementById("figures").appendChild(div); }
      Plotly.react(div, fig.data, fig.layout, CONFIG);
    }
    status.dataset.lastStep = s.last_step === null ? "" : String(s.last_step);
    status.className = s.error ? "status warn" : "status";
    status.textContent = (s.last_step === null ? "waiting for the first recorded step" :
        `last recorded step ${s.last_step} (${s.steps} recorded, ${s.epochs} epoch(s)), written ${s.age_s} s ago`) +
        (s.error ? ` | store not readable right now (${s.error}); showing the last good view` : "") +
        ` | refreshed ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    status.className = "status warn";
    status.textContent = `gradflow watch is not answering (${err}); retrying`;
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
"""


def live_page(store: str, refresh_s: float) -> str:
    """The live page: plotly.js inlined, figures fetched from ``data`` every ``refresh_s`` seconds."""
    body = f'<p id="status" class="status" data-last-step="">connecting…</p><div id="figures"></div>'
    script = LIVE_SCRIPT % {"config": json.dumps(CONFIG), "refresh_ms": int(refresh_s * 1000)}
    return page(f"gradflow watch: {store}", body, script)
