"""The console entry point: usage errors are one `error:` line with exit code 2, like GradflowError."""

import subprocess
import sys

import pytest


def gradflow(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from gradflow.cli import main; sys.argv = ['gradflow', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["train", "--depth", "abc"], "'--depth'"),            # wrong type: typer would draw a box
    (["bench", "--steps", "0"], "'--steps'"),              # out of range
    (["--bogus"], "--bogus"),                              # unknown option
    (["plot"], "'STORE'"),                                 # missing argument
    (["plot", "/nonexistent/store.zarr"], "no gradflow store"),  # GradflowError
])
def test_user_mistakes_are_one_line_and_exit_2(args, words):
    result = gradflow(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bare_command_shows_help():
    result = gradflow()
    assert result.returncode == 0
    assert "sweep" in result.stdout and "plot" in result.stdout and not result.stderr


def test_help_shows_no_type_on_flags_and_plain_argument_names():
    for command in ("check", "plot", "report", "sweep", "train", "watch"):
        result = gradflow(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "<bool>" not in result.stdout and "{" not in result.stdout.splitlines()[0]
    usage = gradflow("plot", "--help").stdout.splitlines()[0]
    assert usage.endswith("plot [OPTIONS] STORE")
    assert "  STORE <str>" in gradflow("check", "--help").stdout  # not "store <str>"
    assert "--bn / --no-bn" in gradflow("sweep", "--help").stdout


def test_permission_denied_is_one_line_and_exit_2(run_main, monkeypatch, tmp_path):
    import gradflow.repair

    lock = str(tmp_path / ".run.zarr.gradflow" / "store.lock")

    def refused(url, repair=False):  # check --repair of a store another user owns
        raise PermissionError(13, "Permission denied", lock)

    monkeypatch.setattr(gradflow.repair, "check_report", refused)
    code, out, err = run_main("check", tmp_path / "run.zarr", "--repair")
    assert code == 2 and err == f"error: Permission denied: {lock}\n" and "Traceback" not in out


def test_an_error_after_the_progress_display_started_leaves_stdout_empty(tmp_path):
    # train opens its progress display before it loads the data; where stdout is a pipe the display
    # is off, so nothing (not even rich's blank final frame) precedes the error line.
    result = gradflow("train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run.zarr"))
    assert result.returncode == 2 and result.stdout == "", repr(result.stdout)
    assert result.stderr.startswith("error: ") and "'synthetic'" in result.stderr
