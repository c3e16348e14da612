"""Where a layer sits in an encoder-decoder network, read from its qualified name.

The FCN family names its modules ``down<i>.…`` (contracting path), ``across.…`` (centre),
``up<i>.…`` (expanding path), ``skip<i>.…`` (long-skip merge convs) and ``classifier``. Plots use
:func:`stage_of` to label heatmap axes like the paper's Fig. 4 (encoder left, centre middle,
decoder right). Names that do not follow the scheme (any user model) map to ``"other"``.
"""

from __future__ import annotations

STAGES = ("encoder", "centre", "decoder", "skip", "other")


def stage_of(layer_name: str) -> str:
    """Return one of ``STAGES`` for a qualified module name such as ``down3.block2.conv1``."""
    head = layer_name.split(".", 1)[0]
    if head.startswith("down"):
        return "encoder"
    if head == "across":
        return "centre"
    if head.startswith("up") or head == "classifier":
        return "decoder"
    if head.startswith("skip"):
        return "skip"
    return "other"
