"""The library's progress callbacks drawn as rich bars: a bar per task while it runs."""

import io

from rich.console import Console

from gradflow.cli._progress import ProgressBars


def test_a_bar_comes_with_its_task_and_goes_when_the_task_is_done():
    with ProgressBars(console=Console(file=io.StringIO())) as bars:
        bars("train: steps", 0, 2, "epoch 0")
        (task,) = bars.display.tasks
        assert (task.completed, task.total, task.description) == (0, 2, "train: steps (epoch 0)")
        bars("train: steps", 1, 2, "epoch 0")
        assert bars.display.tasks[0].completed == 1
        bars("train: steps", 2, 2, "epoch 0")
        assert bars.display.tasks == []
        bars("train: steps", 0, 2, "epoch 1")  # the next epoch's steps: a new bar
        assert [t.description for t in bars.display.tasks] == ["train: steps (epoch 1)"]
