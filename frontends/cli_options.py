"""Options shared by the ``cairn`` commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

DEFAULT_CONFIG = "cairn.yaml"


def config_option(help_text: str = "The YAML configuration file.") -> Callable[[F], F]:
    """``--config/-c FILE`` (default ``cairn.yaml``, or ``$CAIRN_CONFIG``) as ``config_path``."""

    def decorate(func: F) -> F:
        return click.option(
            "--config",
            "-c",
            "config_path",
            type=click.Path(path_type=Path),
            default=DEFAULT_CONFIG,
            show_default=True,
            envvar="CAIRN_CONFIG",
            show_envvar=True,
            help=help_text,
        )(func)

    return decorate
