"""The CLI's argument parser: a configuration error is one message, not a usage dump.

jsonargparse answers a bad value, a missing argument or an unknown key by printing the whole
usage (80 lines for ``fit``) before the error, and a class that refuses its arguments at
construction (a :class:`~pl_federated.validation.ConfigError`, e.g. ``FedProx.mu: null``)
arrives wrapped in jsonargparse's alternatives ("Expected a dot import path string", ...).
:class:`FederatedArgumentParser` keeps jsonargparse's checks and messages and changes only how
a top-level failure is reported.
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser

from pl_federated.validation import ConfigError

DEBUG_VARIABLE = "PL_FEDERATED_DEBUG"
"""Set to 1 to get the traceback of a configuration error instead of its one message."""


def debugging() -> bool:
    """Whether :data:`DEBUG_VARIABLE` asks for tracebacks."""
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def config_error_in(error: BaseException | None) -> ConfigError | None:
    """The :class:`ConfigError` among the causes and contexts of ``error`` (jsonargparse
    chains the exceptions of the alternatives it tried), if any: a class's own check of its
    arguments, reported in its own words."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop(0)
        if error is None or id(error) in seen:
            continue
        if isinstance(error, ConfigError):
            return error
        seen.add(id(error))
        pending += [error.__cause__, error.__context__]
    return None


def condense(message: str) -> str:
    """jsonargparse's message without its type reprs: ``Parser key "model.seed":\\n
    Expected a <class 'int'>. Got value: x`` -> ``model.seed: Expected a int. Got value: x``."""
    message = re.sub(r'Parser key "([^"]+)":\s*', r"`\1`: ", message.strip())
    message = re.sub(r"<class '([\w.]+)'>", r"\1", message)
    return message


class FederatedArgumentParser(LightningArgumentParser):
    """LightningCLI's parser (every check unchanged) whose errors are one message.

    A failure caused by a :class:`ConfigError` raises that error (the console script prints
    its one line and exits with status 2); any other parse error prints ``<prog>: error:
    <message>`` and a pointer to ``--help``, without the usage, and exits with status 2.
    Nested parsers that do not exit on error, and ``PL_FEDERATED_DEBUG=1``, keep jsonargparse's
    behaviour (a raised ``ArgumentError`` with its traceback).
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        cause = config_error_in(ex) or config_error_in(sys.exc_info()[1])
        if debugging():
            raise ArgumentError(None, message) from (cause or ex)
        if cause is not None:
            raise cause
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {condense(message)}\n(`{prog} --help` lists the options)\n"
        )
        self.exit(2)
