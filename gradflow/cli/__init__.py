"""The ``gradflow`` command line: one file per command, all registered on one typer app.

User mistakes (``GradflowError``) become one line on stderr and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="gradflow",
    help="Gradient-flow analysis for PyTorch: record, sweep, plot, report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags read "--bn / --no-bn", not "--bn --no-bn <bool>"
)


class _Command(typer.core.TyperCommand):
    """A command whose usage line names arguments as ``STORE`` (required) / ``[STORE]``, not ``{store}``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name or "").upper()
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _register() -> None:
    """Import the command modules; each one adds its command(s) to ``app``."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for command in app.registered_commands:
        if command.cls in (None, typer.core.TyperCommand):
            command.cls = _Command


INTERRUPTED = 130  # the shell's exit code for Ctrl-C


DAMAGED = 2  # the exit code of a command that meets a damaged store (as `gradflow.open` refuses it)


def main() -> None:
    """Console entry point: every user mistake is one ``error:`` line and exit code 2.

    That covers our own ``GradflowError``, a ``PermissionError`` (a store or folder this user may not
    read or write: ``check --repair`` of a read-only store) and the parser's usage errors (an option
    value of the wrong type, an unknown option), which typer would otherwise draw as a multi-line box.
    """
    from gradflow.errors import GradflowError

    try:  # recent typer vendors click; older releases use the click package
        from typer._click import exceptions as cli_errors
    except ImportError:
        from click import exceptions as cli_errors
    shown_help = getattr(cli_errors, "NoArgsIsHelpError", ())  # bare `gradflow`: show the help

    _register()
    try:
        code = app(standalone_mode=False)
    except GradflowError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except PermissionError as err:  # someone else's store or folder, a read-only one: not our bug
        typer.echo(f"error: {err.strerror or 'permission denied'}: {err.filename or err}", err=True)
        sys.exit(2)
    except shown_help as err:  # a bare command: its help, on stdout
        typer.echo(err.format_message())
        sys.exit(0)
    except cli_errors.ClickException as err:
        typer.echo(f"error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except Exception as err:  # a chunk that does not decode, met outside a command's `reading`
        from gradflow.check import decode_error

        error = decode_error(err)
        if error is None:
            raise
        typer.echo(f"error: {error}", err=True)
        sys.exit(DAMAGED)
    if code == INTERRUPTED:  # typer turns Ctrl-C into exit code 130
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        typer.echo("interrupted (rerunning the same sweep resumes it)" if command == "sweep"
                   else "interrupted", err=True)
    sys.exit(code if isinstance(code, int) else 0)
