"""Telling the kit's own clear errors from unexpected ones, for the ``emolightning`` command.

The kit refuses bad input with a ``ValueError``, an ``OSError`` (``FileNotFoundError``,
``FileExistsError``) or a ``RuntimeError`` whose message names the option or file and says what
to do. The command prints such an error as one line; anything else keeps its traceback, which is
what a bug report needs. An error is the kit's own when a ``raise`` statement in the
emolightning package raised it with a message. A ``ValueError`` that Python or a library raised
while the kit's code ran (``int("x")``, a torch shape check) is not: the innermost frame of its
traceback is then a call, not a ``raise``. This needs no special exception type, so every
message the kit already writes, and every one added later, qualifies by being raised.
"""

from __future__ import annotations

import dis
import os
from types import TracebackType
from typing import Optional

DEBUG_VARIABLE = "EMOLIGHTNING_DEBUG"
"""Set to ``1`` to see the full traceback of the kit's own errors too."""

_KINDS = (ValueError, OSError, RuntimeError)


def _module_name(traceback: TracebackType) -> str:
    frame_globals = traceback.tb_frame.f_globals
    spec = frame_globals.get("__spec__")  # `python -m emolightning.cli` runs cli.py as __main__
    return spec.name if spec is not None else str(frame_globals.get("__name__", ""))


def _raised_by_raise_statement(traceback: TracebackType) -> bool:
    return any(instruction.offset == traceback.tb_lasti and instruction.opname == "RAISE_VARARGS"
               for instruction in dis.get_instructions(traceback.tb_frame.f_code))


def is_kit_error(error: BaseException) -> bool:
    """Whether ``error`` is one of the kit's own messages about bad input (see the module's doc).

    Args:
        error: the exception that ended the command.

    Example:
        >>> try:
        ...     check_learning_rates(config)
        ... except ValueError as error:
        ...     assert is_kit_error(error)
    """
    if not isinstance(error, _KINDS) or isinstance(error, NotImplementedError) or not str(error):
        return False
    innermost: Optional[TracebackType] = error.__traceback__
    if innermost is None:
        return False
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    name = _module_name(innermost)
    return (name == "emolightning" or name.startswith("emolightning.")) and _raised_by_raise_statement(innermost)


def show_traceback() -> bool:
    """Whether the user asked for full tracebacks (``EMOLIGHTNING_DEBUG=1``)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")
