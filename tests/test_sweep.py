import dataclasses
import os

import pytest

from gradflow.errors import GradflowError
from gradflow.sweep import absolute_store, expand_grid, plan, variant_name
from gradflow.train import TrainConfig


def test_names_spell_out_the_variant():
    config = TrainConfig(block="simple", depth=7, batch_norm=False, long_skip="sum", short_skip=False, seed=2)
    assert variant_name(config) == "simple-d7-bn0-long_sum-short0"
    assert variant_name(config, with_seed=True) == "simple-d7-bn0-long_sum-short0-s2"
    # The optimizer shows only when it is not the paper's RMSprop, whatever the rest of the grid is.
    sgd = dataclasses.replace(config, optimizer="sgd")
    assert variant_name(sgd) == "simple-d7-bn0-long_sum-short0-sgd"
    assert variant_name(sgd, with_seed=True) == "simple-d7-bn0-long_sum-short0-sgd-s2"


def test_grid_is_the_cartesian_product_depth_major():
    base = TrainConfig(width=8, epochs=3)
    variants = expand_grid(base, depths=[3, 9, 3], batch_norms=[False], long_skips=["sum", "none"],
                           short_skips=[False, True])
    assert [v.name for v in variants] == [
        f"simple-d{d}-bn0-long_{l}-short{s}" for d in (3, 9) for l in ("sum", "none") for s in (0, 1)]
    v = variants[-1]
    assert (v.config.depth, v.config.long_skip, v.config.short_skip, v.config.width, v.config.epochs) == (
        9, "none", True, 8, 3)
    seeds = expand_grid(base, depths=[3], seeds=[0, 1])
    assert [v.name for v in seeds] == ["simple-d3-bn1-long_sum-short0-s0", "simple-d3-bn1-long_sum-short0-s1",
                                       "simple-d3-bn1-long_sum-short1-s0", "simple-d3-bn1-long_sum-short1-s1"]


def test_local_paths_become_absolute_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_store("a.zarr") == os.path.join(str(tmp_path.resolve()), "a.zarr")
    assert absolute_store("s3://bucket/a.zarr") == "s3://bucket/a.zarr"


def test_plan_on_a_new_store_trains_everything(tmp_path):
    variants = expand_grid(TrainConfig(), depths=[1])
    assert plan(variants, str(tmp_path / "none.zarr")) == (variants, [])
    with pytest.raises(GradflowError, match="same name"):
        plan(variants + variants[:1], str(tmp_path / "none.zarr"))


def test_optimizer_axis_with_a_learning_rate_each():
    base = TrainConfig(lr=0.5)
    variants = expand_grid(base, depths=[3], short_skips=[False], optimizers=["rmsprop", "sgd", "rmsprop"],
                           learning_rates={"sgd": 1e-2})
    assert [(v.name, v.config.optimizer, v.config.lr) for v in variants] == [
        ("simple-d3-bn1-long_sum-short0", "rmsprop", 0.5),  # not in learning_rates: base.lr
        ("simple-d3-bn1-long_sum-short0-sgd", "sgd", 1e-2)]
    alone = expand_grid(dataclasses.replace(base, optimizer="sgd"), depths=[3], short_skips=[True])
    assert [(v.name, v.config.optimizer, v.config.lr) for v in alone] == [("simple-d3-bn1-long_sum-short1-sgd", "sgd", 0.5)]
    with pytest.raises(GradflowError, match="optimizer must be"):
        expand_grid(base, depths=[3], optimizers=["adam"])


def test_names_show_optimizer_settings_only_when_not_torch_defaults():
    base = TrainConfig(depth=9, short_skip=False)
    assert variant_name(base) == "simple-d9-bn1-long_sum-short0"
    keras = dataclasses.replace(base, weight_decay_mode="l2", rmsprop_alpha=0.9)
    assert variant_name(keras) == "simple-d9-bn1-long_sum-short0-wd_l2-alpha0.9"
    assert variant_name(dataclasses.replace(keras, weight_decay=0.0)) == "simple-d9-bn1-long_sum-short0-wd0-alpha0.9"
    table1 = dataclasses.replace(base, arch="table1", width=8, long_skip="none", short_skip=True)
    assert variant_name(table1) == "table1-w8-bn1-long_none-short1"


def test_presets_are_the_papers_experiments_with_its_settings():
    from gradflow.sweep import preset_variants

    fig4 = preset_variants("fig4")
    assert [v.label[:3] for v in fig4] == ["(a)", "(b)", "(c)", "(d)"]
    assert [(v.config.depth, v.config.batch_norm, v.config.short_skip, v.config.long_skip) for v in fig4] == [
        (9, True, True, "sum"), (9, True, False, "sum"), (3, True, False, "sum"), (7, False, False, "sum")]
    table3 = preset_variants("table3")
    assert [(v.config.arch, v.config.long_skip, v.config.short_skip) for v in table3] == [
        ("table1", "sum", True), ("table1", "none", True), ("table1", "sum", False)]
    (table2,) = preset_variants("table2")
    assert (table2.config.loss, table2.config.dropout, table2.config.score_passes) == ("dice", 0.2, 10)
    for v in fig4 + table3 + [table2]:  # the paper's training settings, Keras 1.x RMSprop and l2 decay
        c = v.config
        assert (c.optimizer, c.lr, c.weight_decay, c.weight_decay_mode, c.rmsprop_alpha) == (
            "rmsprop", 1e-3, 1e-3, "l2", 0.9)
        assert (c.size, c.crop, c.n_train, c.n_val, c.augment, c.init) == (512, 0, 25, 5, True, "he")


def test_preset_overrides_reach_every_variant_and_panel_settings_are_refused():
    from gradflow.sweep import preset_variants

    variants = preset_variants("table3", {"width": 8, "crop": 128, "epochs": 2, "rmsprop_alpha": 0.99}, seeds=[0, 1])
    assert len(variants) == 6 and variants[0].name == "table1-w8-bn1-long_sum-short1-wd_l2-s0"
    assert all((v.config.width, v.config.crop, v.config.epochs, v.config.rmsprop_alpha) == (8, 128, 2, 0.99)
               for v in variants)
    with pytest.raises(GradflowError, match="short_skip per panel"):
        preset_variants("table3", {"short_skip": False})
    with pytest.raises(GradflowError, match="unknown preset"):
        preset_variants("fig5")
    with pytest.raises(GradflowError, match="unknown setting"):
        preset_variants("fig4", {"colour": 1})
