"""``gradflow check``, and damaged stores / unknown URLs as one error line with exit 2 in every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import gradflow

TINY = ["--size", "32", "--levels", "2", "--width", "4", "--epochs", "1", "--n-train", "4", "--n-val", "2",
        "--batch-size", "2", "--device", "cpu", "--depth", "1"]


def record(store: Path, steps: int = 3) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store) as rec:
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
        rec.end_epoch(train_loss=1.0)


def test_check_reports_and_repairs(tmp_path, run_main):
    store = tmp_path / "run.zarr"
    record(store)
    assert run_main("check", store) == (0, "(run): ok, 3 steps, 1 epochs\n", "")
    (store / "grad_norm/c/0/0").unlink()
    code, out, err = run_main("check", store)
    assert code == 1 and out == "(run): ./grad_norm: chunk of rows 0-2 is missing (its figures are lost: NaN)\n"
    assert "--repair" in err
    code, out, _ = run_main("check", store, "--repair")
    assert code == 0 and out.splitlines()[-1] == "(run): repaired, kept 3 of 3 steps and 1 of 1 epochs"
    assert run_main("check", store)[0] == 0


@pytest.mark.parametrize("command", [["plot"], ["report"], ["check"]])
def test_damaged_and_foreign_stores_are_one_line_exit_2(tmp_path, command, run_main):
    store = tmp_path / "run.zarr"
    record(store)
    (store / "step/c/0").unlink()
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr/zarr.json").write_bytes(b"\x00\xff not json")
    cases = [("foo://x.zarr", "not a path or a known fsspec URL"), (tmp_path / "bad.zarr", "damaged")]
    if command != ["check"]:
        cases.append((store, "step: chunk of rows 0-2 is missing"))
    for target, words in cases:
        code, _, err = run_main(*command, target, *(["--out", tmp_path / "out"] if command != ["check"] else []))
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], err


@pytest.mark.parametrize("command", [["train", *TINY], ["sweep", *TINY[:-2], "--depths", "1"]])
def test_unknown_url_protocol_in_train_and_sweep(command, run_main):
    code, _, err = run_main(*command, "--out", "foo://x.zarr")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0] == "error: foo://x.zarr: not a path or a known fsspec URL (Protocol not known: foo)"


def test_damaged_metadata_file_in_check_and_resume(tmp_path, run_main):
    store = tmp_path / "run.zarr"
    record(store)
    with open(store / "grad_norm/zarr.json", "r+b") as f:  # truncate -s 20
        f.truncate(20)
    (store / "zarr.json.partial").write_bytes(b"{")
    code, out, err = run_main("check", store)
    assert code == 1 and out == "(run): grad_norm/zarr.json: damaged (JSONDecodeError)\n"
    model = nn.Linear(3, 2)
    with pytest.raises(gradflow.GradflowError) as error:
        gradflow.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), store, mode="a")
    assert str(error.value) == (f"{store} is damaged (grad_norm/zarr.json: damaged (JSONDecodeError)); "
                                f"run `gradflow check {store} --repair` first")
    code, out, err = run_main("check", store, "--repair")
    assert (code, err) == (0, "") and out.splitlines()[-1] == \
        "(run): repaired, kept 3 of 3 steps and 1 of 1 epochs"
    assert run_main("check", store) == (0, "(run): ok, 3 steps, 1 epochs\n", "")


@pytest.mark.parametrize("chunk, says", [
    ("epochs/num_steps/c/0", "epochs/num_steps: chunk of rows 0-0 is missing (--repair recounts all 1 from "
                             "the step rows)"),
    ("epochs/epoch/c/0", "epochs/epoch: chunk of rows 0-0 is missing (row i is epoch i: --repair rebuilds it)"),
    ("step/c/0", "./step: chunk of rows 0-2 is missing (row i is step i·1: --repair rebuilds it)")])
def test_check_reports_a_lost_count_or_number_in_one_line_exit_1(tmp_path, run_main, chunk, says):
    store = tmp_path / "run.zarr"
    record(store)
    (store / chunk).unlink()
    code, out, err = run_main("check", store)
    assert (code, out) == (1, f"(run): {says}\n") and "--repair" in err
    code, out, _ = run_main("check", store, "--repair")
    assert code == 0 and out.splitlines()[-1] == "(run): repaired, kept 3 of 3 steps and 1 of 1 epochs"
    assert run_main("check", store) == (0, "(run): ok, 3 steps, 1 epochs\n", "")
    assert gradflow.open(store, group="epochs").num_steps.values.tolist() == [3]
