"""Test-side reference for framework loops: what each optimizer step really consumed and did.

Own optimizer hooks, independent of gradflow's: the weights before ``step()``, the gradient when the
optimizer takes it (after the closure, when there is one) and the weights after ``step()``.
"""

from __future__ import annotations

import numpy as np
from torch import nn


def weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().double().cpu().numpy().copy() for n, p in model.named_parameters()}


def grads(model: nn.Module) -> dict:
    return {n: None if p.grad is None else p.grad.double().cpu().numpy().copy()
            for n, p in model.named_parameters()}


def capture_steps(optimizer, model: nn.Module, records: list) -> None:
    """Append (gradient consumed, weights before, weights after) to ``records`` at every step."""
    state = {}

    def before(opt, args, kwargs):
        state["before"] = weights(model)
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is None:
            state["grad"] = grads(model)
            return None

        def closure_then_capture():
            loss = closure()
            state.setdefault("grad", grads(model))
            return loss

        if len(args) > 1:
            return (args[0], closure_then_capture, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_capture}

    def after(opt, args, kwargs):
        records.append((state.pop("grad"), state.pop("before"), weights(model)))

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)


def layers_of(model: nn.Module) -> dict[str, list[str]]:
    out = {}
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if own:
            out[name or "(root)"] = own
    return out
