"""Benchmarks of the library: one small module each, run as ``gradflow bench NAME [OPTIONS]``.

Each module has ``main(argv=None, progress=None)``: argparse options (``gradflow bench NAME --help``),
a summary on stdout, and a Markdown report with the conditions it was measured under only when
given ``--out`` (an existing report is kept unless ``--force``). ``progress`` is the library's plain
callback (:data:`gradflow.progress.Progress`); the CLI draws it as a bar with ETA. Most modules also
run as ``python -m gradflow.bench.NAME``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradflow.errors import GradflowError
from gradflow.train import INT64_MAX, Range, split_list

MAX_THREADS = 1024  # torch intra-op threads a benchmark option takes


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are GradflowErrors (one line, exit code 2), not a usage dump."""

    def error(self, message: str):  # type: ignore[override]
        raise GradflowError(f"{self.prog}: {message}")


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of benchmark ``name``, described by the first line of its module docstring."""
    return _Parser(prog=f"gradflow bench {name}", description=(doc or "").strip().splitlines()[0])


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """``--out`` (no report without it), ``--force`` (replace an existing one) and ``--note``."""
    parser.add_argument("--out", default=None, help="Markdown report to write (default: none, only the summary).")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--note", default="", help="free text about the machine's conditions, put in the report")


def names_from(choices) -> Callable[[str], str]:
    """An argparse type: a comma-separated list of names, each one of ``choices``."""
    def parse(text: str) -> str:
        bad = [n for n in text.split(",") if n not in choices]
        if bad or not text:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or repr(text)}: choose from {', '.join(choices)}")
        return text
    return parse


def checkout(text: str) -> str:
    """An argparse type: the root of a gradflow checkout (holding ``gradflow/__init__.py``)."""
    if not (Path(text) / "gradflow" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a gradflow checkout (no gradflow/__init__.py)")
    return text


def child_env(checkout: str, **extra: str) -> dict[str, str]:
    """The environment of a benchmark's child process that imports gradflow from ``checkout`` first."""
    path = os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_child(script: str, args: list[str], checkout: str, label: str, **env: str) -> dict:
    """Run ``script`` (a benchmark module's file) with ``args`` in a child process that imports
    gradflow from ``checkout``, from a neutral folder; return the JSON object its last output line
    holds. Raises GradflowError naming ``label`` with the end of its stderr when it fails."""
    result = subprocess.run([sys.executable, script, *args], env=child_env(checkout, **env),
                            capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    if result.returncode != 0:
        raise GradflowError(f"{label} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def in_range(span) -> Callable[[str], int | float]:
    """An argparse type: a number within ``span`` (a :class:`gradflow.train.Range`: an integer, or a
    finite float), else a one-line error naming the option (as the CLI's options check theirs)."""
    def parse(text: str) -> int | float:
        try:
            value = span.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {span.text()}") from None
        problem = span.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def list_of(parse: Callable[[str], Any], option: str, example: str) -> Callable[[str], list]:
    """An argparse type for ``option``: a comma-separated list of one or more ``parse`` values
    (:func:`gradflow.train.split_list`: an empty list or item, ``''``, ``1,,2``, or a value given
    twice is an error, never an empty run)."""
    def parse_list(text: str) -> list:
        try:
            parts = split_list(text, option, example)
        except GradflowError as err:  # argparse names the option itself
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{option}: ")) from None
        return [parse(part) for part in parts]
    return parse_list


positive_int = in_range(Range(int, 1, INT64_MAX))  # steps, repetitions, sizes
seed = in_range(Range(int, 0, INT64_MAX))
threads = in_range(Range(int, 1, MAX_THREADS))


def check_out(out: str | None, force: bool) -> Path | None:
    """The report path, refused before any work when it exists (without ``force``) or is not a file."""
    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise GradflowError(f"--out {out} is a folder; give a file name")
    if path.exists() and not force:
        raise GradflowError(f"--out {out} exists; pass --force to replace it or choose another file")
    return path


def write_report(path: Path | None, text: str) -> None:
    """Write ``text`` to ``path`` (creating folders) and say so; nothing when ``path`` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


def run(main: Callable[[list[str] | None], object]) -> None:
    """``python -m gradflow.bench.NAME``: a usage error is one ``error:`` line and exit code 2."""
    try:
        main(None)
    except GradflowError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
