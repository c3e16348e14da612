"""``gradflow bench``: the Recorder's per-step overhead, interleaved against plain training and a naive recorder."""

from __future__ import annotations

from typing import Annotated

import typer

from gradflow.cli import app


@app.command("bench")
def bench_command(
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per arm (plain, gradflow, naive) and model.")] = 200,
    block: Annotated[int, typer.Option(min=1, help="Steps per interleaved block.")] = 5,
    threads: Annotated[int, typer.Option(min=1, help="Torch CPU threads (1 gives the steadiest timings).")] = 1,
    out: Annotated[str, typer.Option(help="Markdown report to write.")] = "reports/bench_recorder.md",
    note: Annotated[str, typer.Option(help="Free text about the machine's conditions, put in the report.")] = "",
) -> None:
    """Time training steps of a 200-layer MLP and a 25-layer conv net with and without recording every step."""
    from analyses.bench_recorder import main

    main(steps=steps, block=block, threads=threads, out=out, note=note)
