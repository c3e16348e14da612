"""The store schema, declared once: what each variable of a gradflow store is.

Every variable and coordinate of a run's store is one :class:`Variable`: its name, dims, dtype,
meaning (written into the store as the array's ``description`` attribute), unit, how the values of a
layer's parameter tensors combine into the layer's value, and the label figures put on it. The
store (``gradflow.store``) creates its arrays from these declarations, ``analyses`` takes its plot
labels from :func:`label`, and tests take the variable names from here. Adding a recorded figure
means one entry here plus its computation (``gradflow.quantities``).

Units (each array's ``units`` attribute): gradients are in loss units per weight unit, updates
Δw = w_after − w_before and parameter norms in weight units; ``"1"`` marks a dimensionless number;
none for flags, names and the learning rate (whose units depend on the optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION = 1
"""The ``gradflow_schema`` attribute of every run and epoch group; readers refuse a higher one."""

# How the values of a layer's tensors combine into the layer's value.
NORM = "sqrt(Σ over tensors of ‖·‖²)"
MEAN_ABS = "Σ|·| over the layer's elements / their number"
MAX = "max over tensors"
SUM = "Σ over tensors"
RATIO = "the layer's update_norm / its parameter norm before the step"


@dataclass(frozen=True)
class Variable:
    """One array of a run's store.

    ``combine`` is empty for coordinates (they are not combined from tensors); ``label`` is what
    figures write on an axis or colour bar (the name itself when empty).
    """

    name: str
    dims: tuple[str, ...]
    dtype: str
    meaning: str
    unit: str = ""
    combine: str = ""
    label: str = ""


def _step(name: str, meaning: str, unit: str, combine: str, label: str) -> Variable:
    return Variable(name, ("step", "layer"), "float32", meaning, unit, combine, label)


STEP_VARIABLES = (
    _step("grad_norm", "L2 norm of the gradient the optimizer used at this step", "loss/weight", NORM, "‖∇W‖₂"),
    _step("grad_max_abs", "largest |gradient| entry", "loss/weight", MAX, "max |∇W|"),
    _step("update_norm", "L2 norm of the real update w_after - w_before", "weight", NORM, "‖ΔW‖₂"),
    _step("update_mean_abs", "mean |w_after - w_before| over the layer's parameters", "weight", MEAN_ABS,
          "mean |ΔW|"),
    _step("update_max_abs", "largest |w_after - w_before| entry", "weight", MAX, "max |ΔW|"),
    _step("param_norm", "L2 norm of the parameters after the step", "weight", NORM, "‖W‖₂"),
    _step("update_ratio", "update_norm / L2 norm of the parameters before the step", "1", RATIO, "‖ΔW‖ / ‖W‖"),
    _step("nonfinite", "number of NaN or Inf entries in the gradient", "count", SUM,
          "non-finite gradient values"),
)
"""(step, layer) float32: per layer and recorded optimizer step."""

STEP_COORDS = (
    Variable("step", ("step",), "int64", "optimizer step index (skipped steps included)", "step"),
    Variable("epoch", ("step",), "int64", "epoch index (number of end_epoch calls before this step)", "epoch"),
    Variable("wall_time", ("step",), "float64", "Unix time in seconds when the step finished", "s"),
    Variable("skipped", ("step",), "bool",
             "True on a real skip signal: GradScaler found Inf/NaN (scaler= or a fused optimizer's "
             "found_inf) or the training loop called Recorder.skip_step(); the store does not say which"),
)

LAYER_COORDS = (
    Variable("layer", ("layer",), "str", "qualified module name (or parameter name with per_parameter=True)"),
    Variable("depth", ("layer",), "int64", "layer index in module registration order"),
    Variable("module_type", ("layer",), "str", "class name of the module owning the parameters"),
    Variable("num_params", ("layer",), "int64", "number of recorded parameters", "count"),
)

OPTIMIZER_VARIABLES = (
    Variable("lr", ("step", "param_group"), "float64",
             "learning rate of each param group when the optimizer stepped (NaN: no lr / group added later)"),
    Variable("param_group", ("param_group",), "str", "param group: group<j> of the one optimizer, or opt<i>/group<j>"),
)
"""The optimizer's settings per recorded step: one column per param group."""

EPOCH_VARIABLES = (
    Variable("update_mean_abs", ("epoch", "layer"), "float32",
             "mean |W_end - W_start| over the epoch (Drozdzal et al. 2016, Fig. 4)", "weight", MEAN_ABS,
             "mean |ΔW|"),
    Variable("update_norm", ("epoch", "layer"), "float32", "L2 norm of W_end - W_start over the epoch", "weight",
             NORM, "‖ΔW‖₂"),
)
"""(epoch, layer) float32 in the ``epochs`` group: W_start / W_end are the weights at the epoch's ends."""

EPOCH_COORDS = (
    Variable("epoch", ("epoch",), "int64", STEP_COORDS[1].meaning, "epoch"),
    Variable("num_steps", ("epoch",), "int64",
             "optimizer steps in the epoch (-1: lost, no exact recount after damage; see lost_rows)", "count"),
)


def names(variables: tuple[Variable, ...]) -> tuple[str, ...]:
    """The names of ``variables``, in their order."""
    return tuple(v.name for v in variables)


def label(name: str) -> str:
    """The figure label of a recorded variable (``"update_mean_abs"`` → ``"mean |ΔW|"``); other names as given."""
    for variable in STEP_VARIABLES + EPOCH_VARIABLES:
        if variable.name == name:
            return variable.label
    return name


LABELS = {v.name: v.label for v in STEP_VARIABLES + EPOCH_VARIABLES}
"""``{variable name: figure label}`` for every recorded (step or epoch) variable."""
