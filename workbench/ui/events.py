"""Reading what the browser sent with a custom event."""
from __future__ import annotations


def event_payload(evt, *keys: str) -> dict:
    """The data that a gr.HTML's script sent with `trigger(name, data)`, as a dict of those of `keys` it
    holds. Gradio hands that data to a handler as attributes of its `gr.EventData` (`evt.option` in the
    documented example of gr.HTML's custom events); the dict behind them is private, so each key is read
    by name. A trigger without data gives {}."""
    found = {}
    for key in keys:
        try:
            found[key] = getattr(evt, key)
        except (AttributeError, TypeError):  # not sent; TypeError: no data at all (EventData looks in None)
            pass
    return found
