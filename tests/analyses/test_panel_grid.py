import xarray as xr

from gradflow.analyses.panel_grid import panel_grid, panel_layout


def configured_sweep(sweep_factory, configs: dict[str, dict]) -> xr.DataTree:
    """A hand-made sweep whose variant groups carry the recorded config in ``attrs["metadata"]``."""
    tree = sweep_factory(names=list(configs))
    for name, config in configs.items():
        tree[name].attrs["metadata"] = {"variant": name, "command": "gradflow sweep", "lr": 1e-3, **config}
    return tree


def test_short_skips_across_every_other_varying_setting_down(sweep_factory):
    configs = {}
    for depth in (3, 11):
        for short in (0, 1):
            for optimizer in ("rmsprop", "sgd"):
                suffix = "-sgd" if optimizer == "sgd" else ""
                configs[f"simple-d{depth}-bn0-long_sum-short{short}{suffix}"] = {
                    "depth": depth, "short_skip": bool(short), "optimizer": optimizer, "batch_norm": False}
    grid = panel_grid(configured_sweep(sweep_factory, configs))
    assert grid == [
        ["simple-d3-bn0-long_sum-short0", "simple-d3-bn0-long_sum-short1"],
        ["simple-d3-bn0-long_sum-short0-sgd", "simple-d3-bn0-long_sum-short1-sgd"],
        ["simple-d11-bn0-long_sum-short0", "simple-d11-bn0-long_sum-short1"],
        ["simple-d11-bn0-long_sum-short0-sgd", "simple-d11-bn0-long_sum-short1-sgd"],
    ]


def test_a_missing_partner_leaves_an_empty_cell(sweep_factory):
    configs = {"a-d3-short0": {"depth": 3, "short_skip": False}, "a-d3-short1": {"depth": 3, "short_skip": True},
               "a-d5-short1": {"depth": 5, "short_skip": True}}
    assert panel_grid(configured_sweep(sweep_factory, configs)) == [["a-d3-short0", "a-d3-short1"],
                                                                     [None, "a-d5-short1"]]


def test_nothing_to_arrange(sweep, sweep_factory, run_factory):
    assert panel_grid(sweep) is None  # no recorded configs
    same_short = {"a": {"depth": 3, "short_skip": True}, "b": {"depth": 5, "short_skip": True}}
    assert panel_grid(configured_sweep(sweep_factory, same_short)) is None
    _, epoch = run_factory(0)
    assert panel_grid(epoch) is None  # one run


def test_layout_headers_name_what_varies(sweep_factory):
    configs = {}
    for depth in (3, 7):
        for short in (False, True):
            for optimizer in ("rmsprop", "sgd"):
                name = f"simple-d{depth}-bn0-long_sum-short{int(short)}" + ("-sgd" if optimizer == "sgd" else "")
                configs[name] = {"depth": depth, "short_skip": short, "optimizer": optimizer, "batch_norm": False}
    layout = panel_layout(configured_sweep(sweep_factory, configs))
    assert layout.column_labels == ["short skips off", "short skips on"]
    assert layout.row_labels == ["depth 3, rmsprop", "depth 3, sgd", "depth 7, rmsprop", "depth 7, sgd"]
    assert layout.key.startswith("rows: depth × optimizer; columns: short skips")
    assert "batch norm off" in layout.key and "lr 0.001" in layout.key
