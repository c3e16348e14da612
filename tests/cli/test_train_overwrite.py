"""`gradflow train --overwrite` and `--checkpoint`: every input checked first, only gradflow data replaced."""

from __future__ import annotations

import sys

import pytest

import gradflow
from gradflow.train import save_checkpoint

TINY = ["--depth", "1", "--levels", "2", "--width", "4", "--size", "32", "--n-train", "4", "--n-val", "2",
        "--epochs", "1", "--device", "cpu"]


def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    from gradflow.cli import main

    monkeypatch.setattr(sys, "argv", ["gradflow", "train", *TINY, *map(str, args)])
    try:
        main()
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err.strip()
    return 0, capsys.readouterr().err.strip()


def one_error_line(code: int, err: str, word: str) -> None:
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and word in err, err


def test_bad_data_never_costs_the_old_store(tmp_path, monkeypatch, capsys):
    store = tmp_path / "precious.zarr"
    assert run(monkeypatch, capsys, "--out", store)[0] == 0
    before = gradflow.open(store).grad_norm.values.copy()
    one_error_line(*run(monkeypatch, capsys, "--out", store, "--overwrite", "--data", tmp_path / "nonexistent"),
                   "nonexistent")
    assert (gradflow.open(store).grad_norm.values == before).all()  # untouched


def test_overwrite_never_deletes_what_gradflow_did_not_write(tmp_path, monkeypatch, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    one_error_line(*run(monkeypatch, capsys, "--out", precious, "--overwrite"), "not a Zarr store")
    assert (precious / "thesis.tex").read_text() == "years of work"
    import zarr

    other = zarr.open_group(tmp_path / "other.zarr", mode="w")
    other.create_array("mine", shape=(2,), dtype="float32")[:] = [1, 2]
    one_error_line(*run(monkeypatch, capsys, "--out", tmp_path / "other.zarr", "--overwrite"),
                   "not a gradflow store")
    assert zarr.open_group(tmp_path / "other.zarr")["mine"][:].tolist() == [1, 2]


def test_checkpoint_never_overwrites_another_file(tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("do not lose")
    store = tmp_path / "run.zarr"
    one_error_line(*run(monkeypatch, capsys, "--out", store, "--checkpoint", notes, "--overwrite"),
                   "not a gradflow checkpoint")
    assert notes.read_text() == "do not lose" and not store.exists()
    # A gradflow checkpoint is replaced only with --overwrite.
    best = tmp_path / "best.safetensors"
    save_checkpoint({}, best, best_epoch=0)
    one_error_line(*run(monkeypatch, capsys, "--out", store, "--checkpoint", best), "--overwrite")
    assert not store.exists()
    assert run(monkeypatch, capsys, "--out", store, "--checkpoint", best, "--overwrite")[0] == 0
    assert gradflow.open(store).sizes["step"] > 0
    with pytest.raises(gradflow.GradflowError, match="not a gradflow checkpoint"):
        save_checkpoint({}, notes)
    assert notes.read_text() == "do not lose"


def test_a_checkpoint_that_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch,
                                                                        capsys):
    """A checkpoint under a file, in a folder that cannot be made, or naming a folder: one error
    line before anything is trained or created (it was a traceback after the last epoch)."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    store = tmp_path / "run.zarr"
    for checkpoint, says in ((afile / "best.safetensors", "cannot write checkpoint"),
                             ("/proc/gradflow-test/best.safetensors", "cannot write checkpoint"),
                             (tmp_path, "is a folder")):
        one_error_line(*run(monkeypatch, capsys, "--out", store, "--checkpoint", checkpoint), says)
        assert not store.exists() and afile.read_text() == "keep"


@pytest.mark.parametrize("command, says", [("train", "interrupted"),
                                           ("sweep", "interrupted (rerunning the same sweep resumes it)")])
def test_ctrl_c_says_what_a_rerun_does(tmp_path, monkeypatch, capsys, command, says):
    """Ctrl-C: exit 130 and one line; only a sweep promises that a rerun resumes (a rerun of train
    is refused: its --out exists)."""
    import gradflow.sweep
    import gradflow.train
    from gradflow.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gradflow.train, "train", interrupted)
    monkeypatch.setattr(gradflow.sweep, "run_sweep", interrupted)
    args = TINY if command == "train" else ["--depths", "1", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", ["gradflow", command, *args, "--out", str(tmp_path / "s.zarr")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == says
