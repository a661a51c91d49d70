"""Click commands only: parse, call the core, print, map errors to exit codes."""

from __future__ import annotations

import click

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT_SETTINGS)
def cli() -> None:
    """batch-bridge: send dbt rows to the Message Batches API and load the answers back."""


def main() -> None:
    cli()
