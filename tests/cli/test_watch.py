"""``gradflow watch``: the live page follows a store while a Recorder writes it, survives a store that
does not exist yet, a half-done flush and a writer that stopped, and only listens on 127.0.0.1.
Every loop here is bounded (a few seconds at most)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch
import zarr
from browser import browser_page
from torch import nn

import gradflow
from gradflow.analyses.live import LiveView
from gradflow.cli.watch import HOST, make_server


def _model_and_recorder(store):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, optimizer, gradflow.Recorder(model, optimizer, store)


def _steps(model, optimizer, n: int) -> None:
    g = torch.Generator().manual_seed(n)
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(torch.randn(8, 4, generator=g)), torch.randn(8, 1, generator=g)).backward()
        optimizer.step()


def _status(view: LiveView) -> dict:
    return json.loads(view.snapshot())["status"]


def test_live_view_follows_the_store_and_survives_what_writers_do(tmp_path):
    store = tmp_path / "run.zarr"
    view = LiveView(store, bins=20)
    waiting = _status(view)  # not written yet: an answer, not an exception
    assert waiting["last_step"] is None and "no gradflow store" in waiting["error"]

    model, optimizer, rec = _model_and_recorder(store)
    _steps(model, optimizer, 5)
    rec.flush()
    status = _status(view)
    assert status["last_step"] == 4 and status["steps"] == 5 and status["error"] is None
    figures = json.loads(view.snapshot())["figures"]
    assert "heatmap-grad_norm-step" in figures
    assert figures["heatmap-grad_norm-step"]["data"][0]["x"] == ["0", "2"]  # the layer names

    # A flush caught half-way: arrays already longer than the committed (consolidated) state.
    group = zarr.open_group(str(store), mode="a", use_consolidated=False)
    group["grad_norm"].resize((9, 2))
    assert _status(view)["last_step"] == 4

    # The store unreadable for a moment (e.g. replaced mid-write): the last good view stays, with a note.
    (store / "zarr.json").rename(store / "zarr.json.moved")
    broken = json.loads(view.snapshot())
    assert broken["status"]["error"] and broken["status"]["last_step"] == 4 and broken["figures"] == figures
    (store / "zarr.json.moved").rename(store / "zarr.json")

    _steps(model, optimizer, 3)  # the writer goes on ...
    rec.flush()
    assert _status(view)["last_step"] == 7
    # ... and then dies without closing: the view keeps the committed steps and their age grows.
    del rec
    before = _status(view)["age_s"]
    time.sleep(1.1)
    after = _status(view)
    assert after["last_step"] == 7 and after["age_s"] >= before + 1


def test_server_listens_on_loopback_only_and_serves_page_and_data(tmp_path):
    server = make_server(str(tmp_path / "none.zarr"), port=0, refresh=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert server.server_address[0] == HOST == "127.0.0.1"
        base = f"http://127.0.0.1:{server.server_port}"
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert "Plotly.react" in page and "<script src" not in page
        data = json.loads(urllib.request.urlopen(base + "/data", timeout=10).read())
        assert data["status"]["last_step"] is None
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/other", timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def test_port_in_use_is_one_line_exit_2(tmp_path, run_main):
    server = make_server(str(tmp_path / "x.zarr"), port=0)
    try:
        code, out, err = run_main("watch", tmp_path / "x.zarr", "--port", server.server_port)
        assert code == 2 and err.startswith("error: --port") and len(err.strip().splitlines()) == 1
    finally:
        server.server_close()


def test_live_page_in_chromium_shows_a_new_step_within_its_refresh_interval(tmp_path):
    store = tmp_path / "run.zarr"
    model, optimizer, rec = _model_and_recorder(store)
    _steps(model, optimizer, 4)
    rec.flush()
    refresh = 1.0
    server = make_server(str(store), port=0, refresh=refresh)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with browser_page() as browser:
            browser.page.goto(f"http://127.0.0.1:{server.server_port}/")
            browser.page.wait_for_function("document.getElementById('status').dataset.lastStep === '3'",
                                           timeout=15_000)
            label = browser.hover_heatmap("heatmap-grad_norm-step")
            assert re.search(r"(^|\D)[02] \(Linear\)step \d", label), label  # layer name, type, step
            _steps(model, optimizer, 2)
            rec.flush()
            written = time.monotonic()
            browser.page.wait_for_function("document.getElementById('status').dataset.lastStep === '5'",
                                           timeout=(refresh + 4) * 1000)  # one interval plus page work
            assert time.monotonic() - written <= refresh + 4
            heat = browser.page.evaluate("document.getElementById('heatmap-grad_norm-step').calcdata[0][0].z.length")
            assert heat == 6  # one row per recorded step now
            assert browser.errors == [] and browser.blocked == []
    finally:
        rec.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("kind", ["file", "folder", "foreign"])
def test_what_plot_refuses_watch_refuses_before_serving(tmp_path, kind, run_main, monkeypatch):
    """A plain file or another tool's Zarr store was served as a page; it is plot's error line."""
    import gradflow.cli.watch

    target = tmp_path / "target"
    if kind == "file":
        target.write_text("not a store")
    elif kind == "folder":
        target.mkdir()
    else:
        zarr.open_group(str(target), mode="w").create_array("x", shape=(2,), dtype="f4")
    code, _, plot_err = run_main("plot", target, "--out", tmp_path / "figs")
    assert code == 2

    def never_served(*args, **kwargs):
        raise AssertionError("watch started a server")

    monkeypatch.setattr(gradflow.cli.watch, "_Server", never_served)
    code, out, err = run_main("watch", target, "--port", "0")
    assert code == 2 and err == plot_err and len(err.strip().splitlines()) == 1 and out == ""


def test_a_store_not_made_yet_or_an_empty_group_is_watched(tmp_path):
    """What a Recorder or a sweep is about to write is waited for, not refused."""
    zarr.open_group(str(tmp_path / "sweep.zarr"), mode="w")  # run_sweep's root before a variant
    for store in (tmp_path / "later.zarr", tmp_path / "sweep.zarr"):
        server = make_server(str(store), port=0)
        server.server_close()


def test_a_chunk_that_goes_bad_while_watched_is_one_message_on_the_page(tmp_path):
    """A chunk that stopped decoding while the store was watched reached the page as zarr's raw
    error (the two checksums as bytes); the page keeps its last good view and says what check says."""
    import shutil

    from gradflow.store import LayerTable, Rows, RunStore

    names = ("grad_norm", "grad_max_abs", "update_norm", "update_mean_abs", "update_max_abs",
             "param_norm", "update_ratio", "nonfinite")

    def write(store, n: int) -> None:
        steps = {name: np.ones((n, 2), np.float32) for name in names}
        steps.update(step=np.arange(n), epoch=np.zeros(n, dtype=np.int64), wall_time=np.zeros(n),
                     skipped=np.zeros(n, dtype=bool))
        writer = RunStore(str(store), None, LayerTable(["a", "b"], ["Linear", "Linear"], [3, 5]),
                          {"every": 1, "per_parameter": False}, 1, False)
        writer.write(Rows(steps, {}, n))
        writer.close()

    store, grown = tmp_path / "run.zarr", tmp_path / "grown.zarr"
    write(store, 9000)
    write(grown, 9005)
    view = LiveView(store, bins=20)
    good = json.loads(view.snapshot())
    assert good["status"]["error"] is None and good["status"]["steps"] == 9000
    shutil.copytree(grown, store, dirs_exist_ok=True)  # the store grows: the page re-reads ...
    first = store / "summary/256/grad_norm/c/0/0/0"  # ... what it draws grad_norm from, which
    first.write_bytes(first.read_bytes()[:-1] + b"\x00")  # changed on disk meanwhile
    seen = json.loads(view.snapshot())
    assert seen["figures"] == good["figures"]
    assert seen["status"]["error"] == (
        f"{store} is damaged: summary/256/grad_norm: a chunk does not match its CRC-32C checksum "
        f"(changed on disk); `gradflow check {store}` names it and `gradflow check {store} --repair` "
        f"repairs it")
