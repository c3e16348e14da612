"""The library's progress callbacks (:mod:`gradflow.progress`) drawn as rich bars with ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


class ProgressBars:
    """A :data:`gradflow.progress.Progress` callback and a context manager around a ``rich`` display.

    Each task gets a bar when it is first reported and loses it when it reports ``done == total``.
    The bars are drawn only on a terminal: where the console is a pipe or a file, rich would print
    one final frame (a blank line with no task left), which would precede the command's own output.
    """

    def __init__(self, console: Console | None = None, transient: bool = False) -> None:
        self.display = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=console, transient=transient)
        self.display.disable = not self.display.console.is_terminal
        self.tasks: dict[str, TaskID] = {}

    @property
    def console(self) -> Console:
        return self.display.console

    def __enter__(self) -> ProgressBars:
        self.display.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.display.__exit__(*exc)

    def __call__(self, task: str, done: int, total: int, status: str = "") -> None:
        description = f"{task} ({status})" if status else task
        if task not in self.tasks:
            self.tasks[task] = self.display.add_task(description, total=total, completed=done)
        self.display.update(self.tasks[task], completed=done, total=total, description=description)
        if done >= total:
            self.display.remove_task(self.tasks.pop(task))
