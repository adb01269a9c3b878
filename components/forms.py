"""Named inputs for a page's events: a form is a dataclass whose fields are the components an event reads.

An event wired with ``form.inputs()`` (a set of components) hands its handler one dict keyed by component
(Gradio's own convention); ``form.read(that dict)`` gives the same form holding each field's value, so a
handler reads ``values.trigger``, never the 9th of 17 positional values. ``form.filled(...)`` builds that
dict from the page's own defaults, for calling a handler without a browser.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Any, TypeVar

F = TypeVar("F", bound="Form")


class Form:
    """Base for a page's form dataclasses (``@dataclass class TrainForm(Form): ...``)."""

    def components(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    def inputs(self, *more: Any) -> set:
        """The event's inputs: this form's components, and ``more`` (a session's state) read from the same dict."""
        return {*self.components().values(), *more}

    def read(self: F, data: dict) -> F:
        """This form with each field's value from ``data``, the dict Gradio hands the handler."""
        return replace(self, **{name: data[component] for name, component in self.components().items()})

    def filled(self, *more: Any, **values: Any) -> dict:
        """The dict Gradio would hand a handler for this form (and ``more``): each component's value as the
        page starts with it, or the one named in ``values``."""
        unknown = set(values) - set(self.components())
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        data = {component: getattr(component, "value", None) for component in self.inputs(*more)}
        return {**data, **{self.components()[name]: value for name, value in values.items()}}
