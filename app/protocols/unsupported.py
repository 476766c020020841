"""The rule for request fields a server does not implement, in every protocol: refused, by name, when their value
would change the answer; accepted when null, or a value that means "not used" (what official clients send)."""

from typing import Any

ANY = ()  # an inert field whatever its value: it says who asks or where the answer is kept, not what it is


def refused_field(extras: dict[str, Any], inert: dict[str, tuple]) -> str | None:
    """The first of extras (the fields outside a request's schema) whose value would change the answer: not null,
    and not one of the values inert lists for it."""
    for name, value in extras.items():
        if value is None or (name in inert and (inert[name] is ANY or value in inert[name])):
            continue
        return name
    return None
