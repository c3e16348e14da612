"""``gradflow check``, and damaged stores / unknown URLs as one error line with exit 2 in every command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zarr
from torch import nn

import gradflow

TINY = ["--size", "32", "--levels", "2", "--width", "4", "--epochs", "1", "--n-train", "4", "--n-val", "2",
        "--batch-size", "2", "--device", "cpu", "--depth", "1"]


def record(store: Path, steps: int = 3) -> None:
    torch.manual_seed(0)
    record_model(store, nn.Linear(3, 2), steps)


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


# -- the layer table and the other fixed-length arrays -----------------------------------------------

COPY = "the run's fixed_coordinates attribute"


def layered_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def table_of(model: nn.Module) -> tuple[list[str], list[str], list[int]]:
    """(names, class names, parameter counts) of the modules owning parameters, in registration
    order: torch's own view of the model, not gradflow's."""
    rows = [(name, type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)))
            for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    names, types, counts = (list(column) for column in zip(*rows))
    return names, types, counts


def record_model(store: Path, model: nn.Module, steps: int = 3, group: str | None = None) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, store, group=group) as rec:
        for _ in range(steps):
            optimizer.zero_grad()
            model(torch.randn(4, 3)).sum().backward()
            optimizer.step()
        rec.end_epoch(train_loss=1.0)


def assert_layer_table(store: Path, model: nn.Module) -> None:
    """Every copy of the layer coordinates (run, epochs, summary levels) holds the model's table."""
    names, types, counts = table_of(model)
    for ds in (gradflow.open(store), gradflow.open(store, group="epochs")):
        assert ds.layer.values.tolist() == names
        assert ds.module_type.values.tolist() == types
        assert ds.num_params.values.tolist() == counts
        assert ds.depth.values.tolist() == list(range(len(names)))
    assert gradflow.open(store).param_group.values.tolist() == ["group0"]  # one optimizer, one group
    for level in ("256", "4096"):
        summary = zarr.open_group(store / "summary" / level, mode="r")
        assert summary["layer"][:].tolist() == names
        assert summary["stat"][:].tolist() == ["mean", "min", "max", "nonfinite"]


@pytest.mark.parametrize("chunk, label, rows, source", [
    ("layer/c/0", "./layer", "0-2", COPY),
    ("module_type/c/0", "./module_type", "0-2", COPY),
    ("num_params/c/0", "./num_params", "0-2", COPY),
    ("depth/c/0", "./depth", "0-2", "its numbering: row i is i"),
    ("epochs/layer/c/0", "epochs/layer", "0-2", COPY),
    ("epochs/num_params/c/0", "epochs/num_params", "0-2", COPY),
    ("param_group/c/0", "./param_group", "0-0", COPY),
    ("summary/256/layer/c/0", "summary/256/layer", "0-2", COPY),
    ("summary/4096/stat/c/0", "summary/4096/stat", "0-3", COPY)])
def test_lost_layer_table_chunk_is_one_line_exit_1_and_rebuilt(tmp_path, run_main, chunk, label, rows,
                                                              source):
    store = tmp_path / "run.zarr"
    model = layered_model()
    record_model(store, model)
    (store / chunk).unlink()
    code, out, err = run_main("check", store)
    assert (code, out) == (1, f"(run): {label}: chunk of rows {rows} is missing (--repair rebuilds it "
                              f"from {source})\n") and "--repair" in err
    code, out, _ = run_main("check", store, "--repair")
    assert code == 0 and out.splitlines()[-1] == "(run): repaired, kept 3 of 3 steps and 1 of 1 epochs"
    assert (store / chunk).exists()
    assert run_main("check", store) == (0, "(run): ok, 3 steps, 1 epochs\n", "")
    assert_layer_table(store, model)


def test_the_reviewers_case_lost_names_and_sizes(tmp_path, run_main):
    """The chunks of layer, depth, num_params and epochs/layer deleted: before, check said ok and the
    store read layer=['', …], num_params=[0, …]."""
    store = tmp_path / "run.zarr"
    model = layered_model()
    record_model(store, model)
    for chunk in ("layer/c/0", "depth/c/0", "num_params/c/0", "epochs/layer/c/0"):
        (store / chunk).unlink()
    code, out, _ = run_main("check", store)
    assert code == 1 and sorted(out.splitlines()) == [
        "(run): ./depth: chunk of rows 0-2 is missing (--repair rebuilds it from its numbering: row i is i)",
        f"(run): ./layer: chunk of rows 0-2 is missing (--repair rebuilds it from {COPY})",
        f"(run): ./num_params: chunk of rows 0-2 is missing (--repair rebuilds it from {COPY})",
        f"(run): epochs/layer: chunk of rows 0-2 is missing (--repair rebuilds it from {COPY})"]
    with pytest.raises(gradflow.GradflowError, match=r"is damaged: .*/\w+: chunk of rows 0-2 is missing"):
        gradflow.open(store)
    assert run_main("check", store, "--repair")[0] == 0
    assert run_main("check", store) == (0, "(run): ok, 3 steps, 1 epochs\n", "")
    assert_layer_table(store, model)


def edit_copy(store: Path, **changes) -> None:
    """Change (None: drop) entries of the run's fixed_coordinates attribute and republish."""
    root = zarr.open_group(store, mode="r+", use_consolidated=False)
    copy = {k: v for k, v in {**root.attrs["fixed_coordinates"], **changes}.items() if v is not None}
    root.attrs["fixed_coordinates"] = copy
    gradflow.store.consolidate(str(store), fresh=gradflow.store.ALL)


@pytest.mark.parametrize("case", ["no copy left", "copies disagree"])
def test_lost_layer_sizes_without_a_trusted_copy_are_not_repaired(tmp_path, run_main, case):
    """No source holds the lost values, or the ones left disagree: repair writes nothing there (no
    guess, nothing deleted), fixes the rest, and exits 1 saying what is lost."""
    store = tmp_path / "run.zarr"
    model = layered_model()
    record_model(store, model)
    (store / "num_params/c/0").unlink()
    (store / "grad_norm/c/0/0").unlink()  # damage a repair does fix
    if case == "no copy left":
        (store / "epochs/num_params/c/0").unlink()
        edit_copy(store, num_params=None)
        why, lost = "no intact copy holds it", "./num_params rows 0-2, epochs/num_params rows 0-2"
    else:
        edit_copy(store, num_params=[1, 2, 3])  # epochs/num_params holds the real counts
        why, lost = f"{COPY} and epochs/num_params disagree at row 0", "./num_params rows 0-2"
    code, out, err = run_main("check", store)
    assert code == 1
    assert f"(run): ./num_params: chunk of rows 0-2 is missing and lost ({why}); --repair cannot " \
           f"rebuild it" in out.splitlines()
    assert "--repair` repairs what can be repaired" in err  # the grad_norm chunk
    assert err.endswith(f"; it cannot rebuild {lost} (see above)\n")
    code, out, err = run_main("check", store, "--repair")
    assert code == 1 and "still damaged" in err
    assert out.splitlines()[-1] == (f"(run): not repaired: {lost} cannot be rebuilt (no trusted copy "
                                    f"holds them); the rest is repaired, kept 3 of 3 steps and 1 of 1 epochs")
    assert not (store / "num_params/c/0").exists()  # never a guess
    assert (store / "grad_norm/c/0/0").exists()  # the rest repaired
    if case == "copies disagree":
        assert zarr.open_array(store / "epochs/num_params", mode="r")[:].tolist() == table_of(model)[2]
    code, out, _ = run_main("check", store)
    assert code == 1 and out.splitlines()[0].startswith("(run): ./num_params: chunk of rows 0-2 is missing")
    assert "--repair cannot rebuild it" in out
    with pytest.raises(gradflow.GradflowError, match=r"num_params: chunk of rows 0-2 is missing and lost "
                                                     r".*; `gradflow check .*` lists what no repair"):
        gradflow.open(store)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_step_chunk_that_does_not_decode_is_one_line_exit_1_and_rebuilt(tmp_path, run_main, how):
    """Before, check said ok for an empty or garbage chunk and printed a 112-line traceback for a
    truncated ``step`` chunk."""
    store = tmp_path / "run.zarr"
    record(store)
    chunk = store / "step/c/0"
    data = chunk.read_bytes()
    chunk.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"\x00garbage"}[how])
    code, out, err = run_main("check", store)
    assert code == 1 and len(out.splitlines()) == 1 and "Traceback" not in out + err
    assert out.startswith("(run): ./step: chunk of rows 0-2 is damaged (step/c/0: ") \
        and out.endswith("(row i is step i·1: --repair rebuilds it)\n")
    code, out, err = run_main("check", store, "--repair")
    assert (code, err) == (0, "") and "moved to" in out.splitlines()[-1]
    assert run_main("check", store) == (0, "(run): ok, 3 steps, 1 epochs\n", "")
    assert gradflow.open(store).step.values.tolist() == [0, 1, 2]  # record() took 3 steps


def test_a_deleted_root_metadata_file_is_damage_exit_1(tmp_path, run_main):
    store = tmp_path / "run.zarr"
    record(store)
    (store / "zarr.json").unlink()
    for args in (["check", store], ["check", store, "--repair"]):
        code, out, err = run_main(*args)
        assert code == 1 and out.startswith("zarr.json: missing; the folder holds a gradflow run's arrays")
        assert "no gradflow store" not in out + err and "restore it from a backup" in out
        # --repair cannot rebuild it: no hint says it would (it said "--repair repairs what can be
        # repaired: it rewrites damaged metadata ...")
        assert err == ("still damaged: no repair rebuilds zarr.json (see above)\n" if "--repair" in args
                       else "damaged; no repair rebuilds zarr.json (see above), so `--repair` would "
                            "change nothing\n")


def test_a_sweep_root_and_a_runs_metadata_both_lost_are_not_promised_a_repair(tmp_path, run_main):
    """The sweep's root zarr.json held the committed copy of its runs' metadata files: with both
    damaged, --repair rewrote the root and then died in a traceback (and every later check did too).
    Now nothing is written, the line says what to do, and no hint promises a repair; once that run
    is moved out, --repair rewrites the root for the other runs."""
    store = tmp_path / "sweep.zarr"
    for group in ("a", "b"):
        record_model(store, nn.Linear(3, 2), 3, group=group)
    (store / "zarr.json").write_bytes(b"garbage")
    (store / "a/grad_norm/zarr.json").write_bytes(b"{not json")
    before = _files(store)
    line = (f"zarr.json: damaged (JSONDecodeError); the folder holds a sweep's runs, but "
            f"a/grad_norm/zarr.json is damaged (JSONDecodeError) too and its committed copy was in "
            f"that file, so no repair rebuilds it: move a/ out of the store, then `gradflow check "
            f"{store} --repair` rewrites the root for the other runs\n")
    assert run_main("check", store) == (1, line, "damaged; no repair rebuilds a/grad_norm/zarr.json "
                                                 "(see above), so `--repair` would change nothing\n")
    assert run_main("check", store, "--repair") == (
        1, line, "still damaged: no repair rebuilds a/grad_norm/zarr.json (see above)\n")
    assert _files(store) == before  # nothing written
    with pytest.raises(gradflow.GradflowError) as refused:
        gradflow.open(store, group="b")
    assert "--repair" not in str(refused.value)
    (store / "a").rename(tmp_path / "a")
    code, out, err = run_main("check", store, "--repair")
    assert (code, err) == (0, "") and out.splitlines()[-1] == "b: ok, 3 steps, 1 epochs"


def test_a_metadata_file_without_a_committed_copy_is_one_line(tmp_path, run_main):
    """A root zarr.json without consolidated metadata (not what gradflow writes) holds no copy of
    a damaged node metadata file: check printed a traceback; now one line, and no repair promised."""
    store = tmp_path / "run.zarr"
    record(store)
    root = json.loads((store / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (store / "zarr.json").write_text(json.dumps(root))
    (store / "grad_norm/zarr.json").write_bytes(b"garbage")
    for args in (["check", store], ["check", store, "--repair"]):
        code, out, err = run_main(*args)
        assert (code, out) == (1, "grad_norm/zarr.json: damaged (JSONDecodeError); the root zarr.json "
                                  "holds no committed copy of it (no consolidated metadata), so no "
                                  "repair rebuilds it\n")
        assert "no repair rebuilds grad_norm/zarr.json" in err and "Traceback" not in err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["plot", "report", "check", "watch", "train", "sweep"])
def test_a_path_inside_a_store_is_one_line_exit_2_naming_the_store(tmp_path, command, run_main,
                                                                    monkeypatch):
    """`plot run.zarr/epochs` raised TypeError (exit 1); `train --out sweep.zarr/v3` and
    `sweep --out run.zarr/x` wrote a store the outer one never lists. Each command names the store."""
    import gradflow.cli.watch

    def never_served(*args, **kwargs):
        raise AssertionError("watch started a server")

    monkeypatch.setattr(gradflow.cli.watch, "_Server", never_served)
    run, sweep = tmp_path / "run.zarr", tmp_path / "sweep.zarr"
    record(run)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradflow.Recorder(model, optimizer, sweep, group="v1") as rec:
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        rec.end_epoch()
    before = _files(tmp_path)
    options = {"train": TINY, "sweep": [*TINY[:-2], "--depths", "1"]}.get(command, [])
    for path, store in ((run / "epochs", run), (sweep / "v1", sweep), (sweep / "v1" / "epochs", sweep)):
        if command in ("plot", "report") and path == sweep / "v1":
            continue  # a run group of a sweep is drawn: test_a_sweeps_run_group_is_drawn_as_one_run
        target = ["--out", path] if command in ("train", "sweep") else [path]
        if command in ("plot", "report"):
            target += ["--out", tmp_path / "figures"]
        code, out, err = run_main(command, *options, *target)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in out + err, err
        assert lines[0].startswith(f"error: {path} is a path inside the gradflow"), err
        if command in ("train", "sweep"):
            assert "outside" in lines[0] or f"sweep into the store itself: {store}" in lines[0], err
        else:
            assert lines[0].endswith(f"gradflow {command} {store}" + (" (it draws every run of it)"
                                                                       if command == "plot" else "")), err
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command", ["plot", "report", "watch", "check"])
def test_a_sweep_group_that_does_not_exist_is_named(tmp_path, command, run_main, monkeypatch):
    """`report sweep.zarr/v3` (no such variant) said the path is inside the store: now one line
    naming the missing group and the groups there are, exit 2, in every reader (and gradflow.open)."""
    import gradflow.cli.watch

    def never_served(*args, **kwargs):
        raise AssertionError("watch started a server")

    monkeypatch.setattr(gradflow.cli.watch, "_Server", never_served)
    sweep = tmp_path / "sweep.zarr"
    for group in ("v2", "v1"):
        record_model(sweep, nn.Linear(3, 2), 1, group=group)
    before = _files(tmp_path)
    for path in (sweep / "v3", sweep / "v3" / "epochs"):
        code, out, err = run_main(command, path, *(["--out", tmp_path / "o"] if command in ("plot", "report")
                                                   else []))
        assert (code, err) == (2, f"error: {sweep} has no group 'v3'; its groups: v1, v2\n"), err
        with pytest.raises(gradflow.GradflowError, match=f"^{sweep} has no group 'v3'; its groups: v1, v2$"):
            gradflow.open(path)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("command", ["plot", "report"])
def test_a_sweeps_run_group_is_drawn_as_one_run(tmp_path, command, run_main):
    """`gradflow plot sweep.zarr/v1` draws that run, read through the sweep store's commit (as
    `gradflow.open(sweep, group="v1")` reads it), and touches nothing in the store."""
    sweep = tmp_path / "sweep.zarr"
    torch.manual_seed(0)
    for group in ("v1", "v2"):
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with gradflow.Recorder(model, optimizer, sweep, group=group) as rec:
            for _ in range(2):
                model(torch.ones(1, 3)).sum().backward()
                optimizer.step()
                rec.end_epoch(train_loss=1.0)
    before = _files(sweep)
    code, out, err = run_main(command, sweep / "v1", "--out", tmp_path / "figures")
    assert code == 0 and "Traceback" not in err, err
    assert any(line.endswith(".png" if command == "plot" else "report.md")
               for line in out.splitlines()), out
    if command == "report":
        text = (tmp_path / "figures" / "report.md").read_text()
        assert "v2" not in text  # one run: v1's
    assert _files(sweep) == before
    from gradflow.analyses.report import store_name

    assert store_name(sweep / "v1") == "sweep/v1"  # default folder reports/sweep/v1: no clash


def test_a_folder_of_separate_runs_is_refused_not_repaired_into_a_sweep(tmp_path, run_main):
    """`gradflow check myruns --repair` turned a plain folder of runs into a sweep store, after which
    `gradflow check myruns/a.zarr` said "a path inside the gradflow store myruns"."""
    folder = tmp_path / "myruns"
    record(folder / "a.zarr")
    record(folder / "b.zarr")
    error = (f"error: no gradflow store at {folder} (a folder of 2 separate run store(s), not a "
             f"sweep); check each run: gradflow check {folder}/a.zarr\n")
    assert run_main("check", folder) == (2, "", error)
    assert run_main("check", folder, "--repair") == (2, "", error)
    assert not (folder / "zarr.json").exists()
    assert run_main("check", folder / "a.zarr") == (0, "(run): ok, 3 steps, 1 epochs\n", "")


@pytest.mark.parametrize("command", [["plot", "--stat", "grad_norm", "--per", "step"], ["report"],
                                     ["watch", "--port", "0"]])
def test_a_chunk_missing_or_not_decoding_is_the_same_damage_in_every_reader(tmp_path, command,
                                                                           run_main, monkeypatch):
    """A missing chunk was refused at open (exit 2) but one that exists and does not decode
    (truncated, garbage, changed on disk) failed later with exit 1 and no store named, and `watch`
    served it (its /data then held the codec's error). Both are damage: one line naming the
    store and the array, exit 2, nothing served."""
    import gradflow.cli.watch

    def never_served(*args, **kwargs):
        raise AssertionError("watch started a server")

    monkeypatch.setattr(gradflow.cli.watch, "_Server", never_served)
    for how in ("missing", "truncated", "garbage"):
        store = tmp_path / f"{how}.zarr"
        record(store)
        chunk = store / "grad_norm/c/0/0"
        if how == "missing":
            chunk.unlink()
        else:
            chunk.write_bytes(chunk.read_bytes()[:10] if how == "truncated" else b"\x00garbage")
        out = [] if command[0] == "watch" else ["--out", tmp_path / "out"]
        code, _, err = run_main(command[0], store, *command[1:], *out)
        says = ("chunk of rows 0-2 is missing (its figures are lost: NaN)" if how == "missing" else
                "a chunk does not match its CRC-32C checksum (changed on disk)")
        assert code == 2 and err.startswith(f"error: {store} is damaged: ./grad_norm: {says}; ") \
            and err.endswith(f"`gradflow check {store} --repair` repairs it"
                             + (" (see `gradflow check --help`)\n" if how == "missing" else "\n")) \
            and len(err.splitlines()) == 1, err
