"""The Train tab's hardware row: the machine a paid job trains on (Hugging Face Jobs), its price
per hour, and what the chosen steps should take and cost, all shown before launch."""
from __future__ import annotations

from components.feedback import plain
from services.errors import StudioError
from services.providers.base import Provider, TrainRequest

CHEAPEST = ""  # the dropdown's value for "the cheapest machine that fits"
HARDWARE_INFO = "Billed per minute to the account that runs the job, from when it starts until it ends."


def hardware_choices(provider: Provider | None, request: TrainRequest) -> tuple[list[tuple[str, str]], str]:
    """(label, value) pairs for the hardware dropdown, and a line on what was left out or went wrong."""
    if provider is None or not provider.picks_hardware:
        return [], ""
    try:
        options = provider.hardware_options(request)
    except StudioError as exc:
        return [("Cheapest that fits", CHEAPEST)], f"⚠️ Could not list the machines: {plain(exc.user_message())}"
    fitting = [o for o in options if o.fits]
    choices = [("Cheapest that fits", CHEAPEST)] + [
        (f"{o.label}: ${o.usd_per_hour:.2f}/h" + (f" ({o.note})" if o.note else ""), o.name) for o in fitting]
    left_out = [o for o in options if not o.fits]
    note = ""
    if left_out:
        note = "Too small for this model: " + ", ".join(o.label for o in left_out) + "."
    if not fitting:
        note = "⚠️ No machine offered can hold this fine-tune. " + note
    return choices, note


def estimate_markdown(provider: Provider | None, request: TrainRequest, note: str = "") -> str:
    """The estimate's line for the picked machine (and the dropdown's note), or why there is none."""
    if provider is None or not provider.picks_hardware:
        return ""
    try:
        estimate = provider.estimate(request)
    except StudioError as exc:
        return f"⚠️ {plain(exc.user_message())}" + (f"\n\n{note}" if note else "")
    line = f"💳 Estimate: {plain(estimate.summary)}" if estimate is not None else "💳 No estimate for this machine."
    return line + (f"\n\n{note}" if note else "")
