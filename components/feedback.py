"""Turning service errors into messages the person sees."""
from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable
from typing import TypeVar

import gradio as gr

from services.errors import StudioError

log = logging.getLogger("flux_studio.ui")
F = TypeVar("F", bound=Callable)


def plain(text: object) -> str:
    """User text (a name, a caption, a provider's message) made safe to show: toasts and Markdown
    render HTML, so ``<img ...>`` in a fine-tune name would otherwise become an element."""
    return html.escape(str(text), quote=False)


def info(text: str) -> None:
    """A toast; ``text`` is shown as text, never as HTML."""
    gr.Info(plain(text))


def warning(text: str) -> None:
    gr.Warning(plain(text))


def message_for(exc: BaseException, where: str) -> str:
    """What to tell the person about ``exc`` (raw text: ``plain`` it for a page). A StudioError says
    what was wrong and what to do; anything else is a bug, logged and not shown."""
    if isinstance(exc, StudioError):
        return exc.user_message()
    log.error("Unexpected error in %s", where, exc_info=exc)
    return ("Something went wrong on our side. Your data is unchanged; try again, "
            "and if it keeps happening, check the app's log.")


def shows_errors(fn: F) -> F:
    """Wrap a handler: a StudioError becomes a gr.Error toast with its message.

    Anything else is a bug: log it and say so without leaking internals.
    """

    def translate(exc: BaseException) -> gr.Error:
        return gr.Error(plain(message_for(exc, fn.__name__)), print_exception=False)

    if inspect.isgeneratorfunction(fn):  # streaming handlers fail while being iterated
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise translate(exc) from None

        return streaming  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise translate(exc) from None

    return wrapper  # type: ignore[return-value]


def progress_callback(progress: gr.Progress | None):
    """Adapt gr.Progress to the services' ``(done, total, message)`` callback."""
    if progress is None:
        return None

    def report(done: int, total: int, message: str) -> None:
        progress((done, total), desc=message)

    return report
