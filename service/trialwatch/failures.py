"""How an internal error is described where logs and dead letters can see it."""

from __future__ import annotations


def where(exc: BaseException) -> str:
    """Where an exception was raised (file:line): loggable, unlike its message, which may quote a value."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
