"""Progress of long library work, reported through a plain callback (the CLI draws it).

A :data:`Progress` is called as ``progress(task, done, total, status)``: ``task`` names a piece of
work and is the same on every call for it (e.g. ``"train: steps"``), ``done`` of ``total`` units are
finished, and ``status`` is optional text about where it stands (e.g. the last losses). A task
reported with ``done == total`` is finished; it may start again at 0 (the steps of the next epoch).
Library functions take ``progress=None`` and then report nothing.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int, str], None]
