import shlex
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

import gradflow
import gradflow.data
import gradflow.train
from gradflow.sweep import finished_variants


def group_attrs(store, name):
    return dict(zarr.open_group(str(store), mode="r", use_consolidated=False)[name].attrs)


def test_sweep_records_each_variant_with_its_config_and_command(tiny_sweep, tiny, variants):
    tree = gradflow.open(tiny_sweep)
    assert isinstance(tree, xr.DataTree)
    assert sorted(tree.children) == variants
    for name in variants:
        attrs = tree[name].attrs
        assert attrs["finished"] is True
        config = attrs["metadata"]
        assert (config["depth"], config["batch_norm"], config["short_skip"]) == (1, False, name.endswith("short1"))
        assert (config["size"], config["levels"], config["width"], config["epochs"]) == (32, 2, 4, 1)
        assert (config["init"], config["lr"]) == ("scaled", 1e-4)  # the sweep's documented defaults
        assert shlex.split(config["command"]) == ["gradflow", "sweep", "--depths", "1", "--no-bn", *tiny,
                                                  "--out", str(tiny_sweep)]
        epochs = tree[f"{name}/epochs"]
        assert epochs.sizes["epoch"] == 1 and tree[name].sizes["step"] == 2  # 4 images, batch 2
        assert attrs["best_val_loss"] == pytest.approx(float(epochs["val_loss"].values[0]))


@pytest.fixture
def training_calls(monkeypatch):
    """Record which groups ``train`` is called for (the real training still runs)."""
    calls, real_train = [], gradflow.train.train

    def spy(config, store, group=None, **kwargs):
        calls.append(group)
        return real_train(config, store, group, **kwargs)

    monkeypatch.setattr(gradflow.train, "train", spy)
    return calls


def test_interrupted_sweep_keeps_finished_variants_and_resumes_only_the_rest(tmp_path, cli, monkeypatch, tiny,
                                                                               variants, training_calls):
    store = tmp_path / "s.zarr"
    args = ["sweep", "--depths", "1", "--no-bn", *tiny, "--out", store]
    # Ctrl-C in the middle of the second variant's first step (after its Recorder wrote its group).
    real_augment, seen = gradflow.data.augment_batch, []

    def interrupt_on_third_batch(x, y, generator):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real_augment(x, y, generator)

    monkeypatch.setattr(gradflow.data, "augment_batch", interrupt_on_third_batch)
    assert cli(*args).exit_code != 0
    monkeypatch.setattr(gradflow.data, "augment_batch", real_augment)
    assert list(finished_variants(str(store))) == variants[:1]
    assert variants[1] in zarr.open_group(str(store), mode="r", use_consolidated=False)  # the partial group
    tree = gradflow.open(store)  # finished variant intact and readable
    finished_before = tree[f"{variants[0]}/epochs"].to_dataset().load()
    stamp = group_attrs(store, variants[0])["finished_at"]
    assert cli("report", store, "--out", tmp_path / "rep").exit_code == 0
    assert f"Unfinished (interrupted) variants, shown as far as they got: {variants[1]}." in (
        tmp_path / "rep" / "report.md").read_text()
    # A kill can leave junk in the partial group; the rerun must start it from scratch.
    zarr.open_group(str(store), mode="a", use_consolidated=False)[variants[1]].create_array(
        "junk", shape=(3,), dtype="f4")

    training_calls.clear()
    assert cli(*args).exit_code == 0
    assert training_calls == [variants[1]]
    assert list(finished_variants(str(store))) == variants
    assert group_attrs(store, variants[0])["finished_at"] == stamp
    tree = gradflow.open(store)
    xr.testing.assert_identical(tree[f"{variants[0]}/epochs"].to_dataset().load(), finished_before)
    assert "junk" not in tree[variants[1]].to_dataset()
    assert tree[variants[1]].sizes["step"] == 2 and tree[f"{variants[1]}/epochs"].sizes["epoch"] == 1

    training_calls.clear()
    assert cli(*args).exit_code == 0
    assert training_calls == []
    assert cli(*args, "--force").exit_code == 0
    assert training_calls == variants


def test_rerun_with_other_settings_is_refused_not_skipped(tiny_sweep, tmp_path, run_main, tiny):
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_sweep, store)
    code, _, err = run_main("sweep", "--depths", "1", "--no-bn", *tiny, "--epochs", "2", "--out", store)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "epochs 1 vs 2" in err and "--force" in err


@pytest.mark.parametrize("args, message", [
    (["--depths", "a,b"], "--depths: 'a' is not an integer"),
    (["--depths", "3,0"], "--depths: each value must be a positive integer up to 2**63 − 1, got 0"),
    (["--long", "sum,diagonal"], "--long: unknown value 'diagonal'"),
    (["--seeds", "x"], "--seeds: 'x' is not an integer"),
    (["--executor", "spark"], "--executor: unknown value 'spark'"),
    (["--block", "wide"], "block"),
    (["--size", "30"], "size 30"),
    (["--loss", "l2"], "loss"),
    (["--init", "xavier"], "--init: unknown value 'xavier'"),
    (["--optimizer", "rmsprop,adam"], "--optimizer: unknown value 'adam'"),
    (["--lr", "-1"], "--lr: must be a positive number, got -1.0"),
    (["--executor", "ray", "--out", "memory://sweep"], "memory:// store lives in one process"),
    (["--ray-address", "auto"], "--ray-address needs --executor ray"),
])
def test_bad_options_are_one_line_and_exit_2(args, message, tmp_path, run_main, tiny):
    code, out, err = run_main("sweep", "--depths", "1", *tiny, "--out", tmp_path / "s.zarr", *args)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in out + err
    assert not (tmp_path / "s.zarr").exists()
    assert "variant(s)" not in out  # nothing is announced before the error


def test_default_grid_trains_both_optimizers_each_with_its_own_lr(tmp_path, cli, tiny):
    assert tiny[-2:] == ["--optimizer", "rmsprop"]
    common = ["sweep", "--depths", "1", "--no-bn", "--short", *tiny[:-2]]
    store = tmp_path / "s.zarr"
    assert cli(*common, "--out", store).exit_code == 0
    expected = {"simple-d1-bn0-long_sum-short1": ("rmsprop", "RMSprop", 1e-4),
                "simple-d1-bn0-long_sum-short1-sgd": ("sgd", "SGD", 1e-2)}
    tree = gradflow.open(store)
    assert sorted(tree.children) == sorted(expected)
    for name, (option, torch_class, lr) in expected.items():
        (optimizer,) = tree[name].attrs["optimizers"]  # what the Recorder saw the loop use
        assert (optimizer["class"], optimizer["param_groups"][0]["lr"]) == (torch_class, lr)
        assert (tree[name].attrs["metadata"]["optimizer"], tree[name].attrs["metadata"]["lr"]) == (option, lr)
        if option == "sgd":
            assert optimizer["param_groups"][0]["momentum"] == 0.9 and optimizer["param_groups"][0]["nesterov"] is False

    # --lr is one rate for every optimizer of the grid.
    store = tmp_path / "lr.zarr"
    assert cli(*common, "--lr", "0.003", "--out", store).exit_code == 0
    tree = gradflow.open(store)
    assert [tree[name].attrs["optimizers"][0]["param_groups"][0]["lr"] for name in sorted(expected)] == [0.003, 0.003]


def test_data_folder_without_images_is_a_user_error(tmp_path, run_main, tiny):
    (tmp_path / "empty").mkdir()
    code, _, err = run_main("sweep", "--depths", "1", *tiny, "--data", tmp_path / "empty", "--out", tmp_path / "s.zarr")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_out_that_exists_and_is_not_a_zarr_store_is_refused_untouched(kind, tmp_path, run_main, tiny):
    out = tmp_path / "taken"
    if kind == "file":
        out.write_text("not a store")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out_text, err = run_main("sweep", "--depths", "1", *tiny, "--out", out)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "not a Zarr store" in err and "Traceback" not in out_text + err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) in ("not a store", "mine")


@pytest.mark.parametrize("kind", ["foreign", "run"])
def test_out_that_is_another_tools_store_or_a_run_is_refused_untouched(kind, tmp_path, run_main, tiny):
    """`sweep --out` wrote its variants into an xarray store (exit 0) that the Recorder refuses."""
    out = tmp_path / "theirs.zarr"
    if kind == "foreign":
        xr.Dataset({"a": ("x", np.arange(3.0))}).to_zarr(out)
        words = "is not a gradflow store (another tool's Zarr store)"
    else:
        import torch

        model = torch.nn.Linear(2, 1)
        gradflow.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), out).close()
        words = "holds a single run at its root"
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    code, out_text, err = run_main("sweep", "--depths", "1", *tiny, "--out", out)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert words in err and "Traceback" not in out_text + err
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_ray_executor_without_ray_says_how_to_install(tmp_path, run_main, monkeypatch, tiny):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code, _, err = run_main("sweep", "--depths", "1", *tiny, "--executor", "ray", "--out", tmp_path / "s.zarr")
    assert code == 2 and "pip install 'gradflow[ray]'" in err


def test_ray_executor_trains_every_variant_on_a_local_instance(tmp_path, cli, tiny, variants):
    pytest.importorskip("ray")
    store = tmp_path / "ray.zarr"
    result = cli("sweep", "--depths", "1", "--no-bn", *tiny, "--executor", "ray", "--out", store)
    assert result.exit_code == 0, result.output
    assert list(finished_variants(str(store))) == variants
    tree = gradflow.open(store)
    for name in variants:  # the root view is consolidated once all tasks are done
        assert tree[name].attrs["finished"] is True
        assert tree[name].sizes["step"] == 2
        np.testing.assert_array_equal(tree[f"{name}/epochs"]["epoch"].values, [0])


PRESET_TINY = ["--size", "256", "--crop", "128", "--crops-per-image", "1", "--n-train", "1", "--n-val", "1",
               "--width", "4", "--epochs", "1", "--batch-size", "2", "--device", "cpu"]


@pytest.mark.parametrize("preset, extra, names", [
    ("fig4", ["--levels", "2"], ["simple-d3-bn1-long_sum-short0-wd_l2-alpha0.9", "simple-d7-bn0-long_sum-short0-wd_l2-alpha0.9",
                                 "simple-d9-bn1-long_sum-short0-wd_l2-alpha0.9", "simple-d9-bn1-long_sum-short1-wd_l2-alpha0.9"]),
    ("table3", [], ["table1-w4-bn1-long_none-short1-wd_l2-alpha0.9", "table1-w4-bn1-long_sum-short0-wd_l2-alpha0.9",
                    "table1-w4-bn1-long_sum-short1-wd_l2-alpha0.9"]),
    ("table2", ["--score-passes", "2"], ["table1-w4-bn1-long_sum-short1-wd_l2-alpha0.9"]),
])
def test_each_preset_runs_one_tiny_epoch_on_isbi_crops(preset, extra, names, isbi_dir, tmp_path, cli):
    """Two 128² crops (of the 256² tiles of one ISBI image) per variant, one epoch; the paper's settings
    recorded, the overrides too, and for table2 the validation scores."""
    store = tmp_path / f"{preset}.zarr"
    result = cli("sweep", "--preset", preset, "--data", isbi_dir, *PRESET_TINY, *extra, "--out", store)
    assert result.exit_code == 0, result.output
    assert sorted(finished_variants(str(store))) == names
    tree = gradflow.open(store)
    for name in names:
        attrs = tree[name].attrs
        config = attrs["metadata"]
        assert (config["optimizer"], config["lr"], config["weight_decay"], config["weight_decay_mode"],
                config["rmsprop_alpha"], config["init"]) == ("rmsprop", 1e-3, 1e-3, "l2", 0.9, "he")
        assert (config["size"], config["crop"], config["width"], config["data"]) == (256, 128, 4, str(isbi_dir))
        assert config["panel"] and config["device_name"] == "cpu"
        assert tree[name].sizes["step"] == 2  # 4 tiles × 1 crop, batch 2
        assert np.isfinite(tree[f"{name}/epochs"]["val_loss"].values).all()
    if preset == "table2":
        attrs = tree[names[0]].attrs
        assert (config["loss"], config["dropout"], attrs["score_passes"]) == ("dice", 0.2, 2)
        assert all(0.0 <= attrs[key] <= 1.0 for key in ("v_rand", "v_info", "pixel_error"))


@pytest.mark.parametrize("args, message", [
    (["--preset", "fig5"], "--preset: unknown value 'fig5'"),
    (["--preset", "fig4"], "give --data PATH"),
    (["--preset", "fig4", "--data", "x", "--depths", "3"], "--depths: --preset fig4 sets these per panel"),
    (["--preset", "table3", "--data", "x", "--optimizer", "rmsprop,sgd"], "one optimizer"),
    (["--weight-decay-mode", "adamw"], "--weight-decay-mode: unknown value 'adamw'"),
    (["--arch", "unet"], "--arch: unknown value 'unet'"),
    (["--rmsprop-alpha", "1"], "--rmsprop-alpha: must be a number in [0, 1), got 1.0"),
])
def test_bad_preset_and_optimizer_options_are_one_line_and_exit_2(args, message, tmp_path, run_main):
    code, out, err = run_main("sweep", *args, "--out", tmp_path / "s.zarr")
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "chunk"])
def test_rerun_refuses_a_damaged_finished_variant_and_keeps_what_repair_needs(tmp_path, damage, run_main,
                                                                               tiny_sweep, tiny, variants):
    """Rerunning a sweep republishes the store's metadata: over a finished variant whose grad_norm
    metadata file is gone or truncated that would drop grad_norm for good, so the rerun refuses in
    one line (exit 2) and `gradflow check --repair` can still restore it. A missing chunk likewise."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_sweep, store)
    array = store / variants[0] / "grad_norm"
    if damage == "missing":
        (array / "zarr.json").unlink()
    elif damage == "truncated":
        (array / "zarr.json").write_bytes((array / "zarr.json").read_bytes()[:20])
    else:
        shutil.rmtree(array / "c")
    code, out, err = run_main("sweep", "--depths", "1", "--no-bn", *tiny, "--out", store)
    assert code == 2 and f"group '{variants[0]}'" in err and "--repair" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if damage != "chunk":
        assert run_main("check", store, "--repair")[0] == 0
        ds = gradflow.open(store, group=variants[0])
        assert "grad_norm" in ds and np.isfinite(ds.grad_norm.values).all()


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_rerun_over_a_store_whose_root_metadata_is_damaged_is_one_line(tmp_path, run_main, tiny_sweep,
                                                                       tiny, how):
    """The store's own zarr.json truncated (a crash mid-write on a file system without atomic
    renames) or deleted: one line naming the repair, exit 2, nothing rewritten."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_sweep, store)
    damaged = (store / "zarr.json").read_bytes()[:20]
    if how == "deleted":
        (store / "zarr.json").unlink()
    else:
        (store / "zarr.json").write_bytes(damaged)
    code, out, err = run_main("sweep", "--depths", "1", "--no-bn", *tiny, "--out", store)
    problem = "missing" if how == "deleted" else "damaged"
    assert code == 2 and f"root zarr.json is {problem}" in err and "--repair" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (store / "zarr.json").read_bytes() == damaged if how == "truncated" \
        else not (store / "zarr.json").exists()
