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
