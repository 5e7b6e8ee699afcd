"""structlog set-up: JSON lines off a terminal, a console renderer on one."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _renderer(fmt: str) -> structlog.typing.Processor:
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    return structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()


def stdlib_logging_config(level: str = "info", fmt: str = "auto") -> dict[str, Any]:
    """dictConfig for the standard library loggers (Faust, mode, aiokafka): the same JSON lines as ours."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "structlog": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processor": _renderer(fmt),
                "foreign_pre_chain": [
                    structlog.stdlib.add_logger_name,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                ],
            }
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "structlog", "stream": "ext://sys.stderr"}
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
        # Set on the libraries' loggers too: something in Faust's start-up
        # leaves them at DEBUG, and aiokafka builds a debug record per message
        # sent (4 % of the worker's time, measured) even when none is shown.
        "loggers": {name: {"level": level.upper()} for name in ("aiokafka", "faust", "mode")},
    }


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    renderer = _renderer(fmt)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
