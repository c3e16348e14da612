"""``gradflow check STORE``: is a store intact? ``--repair`` repairs damaged runs (:mod:`gradflow.repair`)."""

from __future__ import annotations

from typing import Annotated

import typer

from gradflow.cli import app


@app.command("check")
def check_command(
    store: Annotated[str, typer.Argument(help="A gradflow store: one run or a sweep (path or fsspec URL).",
                                         metavar="STORE")],
    repair: Annotated[bool, typer.Option("--repair", help="Rewrite damaged metadata files from the committed "
                                                          "copy, write lost chunks of float figures as NaN "
                                                          "(every other row is kept), rebuild lost chunks of the "
                                                          "step and epoch numbers (the steps' epoch labels "
                                                          "from num_steps where exact), recount lost num_steps from "
                                                          "the step rows where exact (else mark them lost), "
                                                          "rebuild lost layer names, types, sizes and other "
                                                          "labels from the copy the run keeps (else leave "
                                                          "them missing and exit 1), "
                                                          "cut what else is damaged "
                                                          "to the last consistent commit, and delete leftover "
                                                          "*.partial files.")] = False,
) -> None:
    """One line per run (steps, epochs, damage); exit 0 when intact (or repaired), 1 when damaged."""
    from gradflow.repair import check_report

    report = check_report(store, repair=repair)
    for line in report.lines:
        typer.echo(line)
    lost = ", ".join(report.unrepairable)
    if report.unrepairable and repair:
        typer.echo(f"still damaged: no repair rebuilds {lost} (see above)", err=True)
        raise typer.Exit(1)
    if report.unrepairable and not report.repairable:
        typer.echo(f"damaged; no repair rebuilds {lost} (see above), so `--repair` would change "
                   f"nothing", err=True)
        raise typer.Exit(1)
    if report.damaged and not repair:
        rest = (f"; it cannot rebuild {lost} (see above)" if report.unrepairable else "")
        typer.echo(f"damaged; `gradflow check {store} --repair` repairs what can be repaired: it rewrites "
                   f"damaged metadata, writes lost float "
                   f"figures as NaN, rebuilds lost step and epoch numbers and layer coordinates and cuts the rest to the last "
                   f"consistent commit{rest}", err=True)
        raise typer.Exit(1)
