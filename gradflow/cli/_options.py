"""Command-line options generated from a config dataclass (``TrainConfig``): each option declared once.

A field's type and default make the option, its ``help`` metadata the help text, its ``choices``
metadata the accepted values and its ``range`` metadata (:class:`gradflow.train.Range`) the numbers it
takes, both checked as the option is parsed (one ``error:`` line naming the option, exit code 2); a
``bool`` field becomes a ``--name/--no-name`` switch. Commands add
the options they take with :func:`config_options` and get them back as a dict of field values.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Optional

import typer

from gradflow.errors import GradflowError
from gradflow.train import field_problem

RENAMED = {"batch_norm": "bn", "short_skip": "short", "long_skip": "long"}
"""Fields whose option has a shorter name (``--bn/--no-bn``, ``--short/--no-short``, ``--long``)."""
FIELD_OF = {option: name for name, option in RENAMED.items()}


def flag(field_name: str) -> str:
    """The option a field is set by: ``batch_norm`` → ``--bn``, ``n_train`` → ``--n-train``."""
    return "--" + RENAMED.get(field_name, field_name).replace("_", "-")


def help_text(field: dataclasses.Field) -> str:
    """The field's help, with its choices when it has a fixed set of values."""
    text = field.metadata.get("help", "")
    choices = field.metadata.get("choices")
    return f"{text} One of: {', '.join(choices)}." if choices else text


def parameter(field: dataclasses.Field, kind: type, default: Any = dataclasses.MISSING,
              help: str | None = None) -> inspect.Parameter:
    """The typer parameter of a field of type ``kind`` (``default``/``help`` override the field's own)."""
    default = field.default if default is dataclasses.MISSING else default
    annotation = kind if default is not None else Optional[kind]
    name = RENAMED.get(field.name, field.name)
    decls = [f"{flag(field.name)}/--no-{flag(field.name)[2:]}"] if kind is bool else []
    option = typer.Option(*decls, help=help_text(field) if help is None else help, callback=_checker(field))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


def config_options(config: type, fields: Iterable[str] | None = None, *, exclude: Iterable[str] = (),
                   unset: bool = False, help: dict[str, str] | None = None) -> Callable:
    """Decorator: the command also takes an option per field of ``config`` (all, or ``fields``, less
    ``exclude``), in field order after its own parameters, and receives them as ``options``: a dict
    ``{field name: value}``. ``unset``: options default to None (not given; the help still shows the
    field's default), so the command can tell what was given. ``help``: per field, instead of its own."""
    chosen = [f for f in dataclasses.fields(config)
              if (fields is None or f.name in fields) and f.name not in set(exclude)]
    help = {f.name: (help or {}).get(f.name, help_text(f)) for f in chosen}
    if unset:
        help = {name: text if getattr(config, name) is None else f"{text} (default: {getattr(config, name)})"
                for name, text in help.items()}
    kinds = {name: _plain(hint) for name, hint in typing.get_type_hints(config).items()}
    generated = [parameter(f, kinds[f.name], None if unset else dataclasses.MISSING, help[f.name])
                 for f in chosen]
    names = {RENAMED.get(f.name, f.name): f.name for f in chosen}

    def decorate(command: Callable) -> Callable:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {names[key]: kwargs.pop(key) for key in list(kwargs) if key in names}
            return command(**kwargs, options=options)

        signature = inspect.Signature([*own, *generated])
        wrapper.__signature__ = signature
        wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
        return wrapper

    return decorate


def _checker(field: dataclasses.Field) -> Callable[[Any], Any]:
    """The parse-time check of a field's option: its ``choices`` and ``range``
    (:func:`gradflow.train.field_problem`: ``--init: unknown value 'x'; choose from …``, ``--seed: must
    be a non-negative integer …``, a :class:`GradflowError`); None (not given) passes."""
    def check(value: Any) -> Any:
        problem = None if value is None else field_problem(field, value, flag(field.name))
        if problem:
            raise GradflowError(problem)
        return value
    return check


def _plain(hint: Any) -> type:
    """``float | None`` → ``float``; a plain type as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
