"""The ``prerank`` command line. Each area registers its commands from its own module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="prerank",
    help="Pre-ranking models for cascade ranking: data recipes, training, evaluation, export and serving.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    from prerank.cli import cascade, data, distill, select, serve, teacher, train  # noqa: F401  (registers commands)
    from prerank.train.distributed import teardown

    # leave the process group of a torchrun process (nothing to do in a single process); wait for the others on success
    try:
        app()
    except SystemExit as e:
        teardown(wait=not e.code)
        raise
    except BaseException:
        teardown(wait=False)
        raise
    teardown()
