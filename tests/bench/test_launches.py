"""The launches benchmark's measurement, in process, on the two small models (a few steps)."""

from __future__ import annotations

from gradflow.bench import launches


def test_foreach_ops_per_step_do_not_depend_on_the_shapes(monkeypatch):
    """The multi-tensor path costs the same dispatches for 400 tensors of 3 shape classes (mlp) as
    for 50 tensors of 4 (conv); the stacking path grows with the classes."""
    from gradflow import buckets

    monkeypatch.setattr(buckets, "STRATEGY", buckets.STRATEGY)  # child() sets it; restore
    runs = {(m, s): launches.child(m, s, steps=1, block=1, profile_steps=1)
            for m in ("mlp", "conv") for s in ("stack", "foreach")}
    assert runs["mlp", "foreach"]["ops"] == runs["conv", "foreach"]["ops"] <= 16
    assert runs["mlp", "stack"]["ops"] > runs["mlp", "foreach"]["ops"]
    assert runs["mlp", "stack"]["tensors"] == 400 and runs["conv", "stack"]["tensors"] == 50
    assert all(r["hooks_ms"] > 0 and r["wall_ratio"] > 0 for r in runs.values())
