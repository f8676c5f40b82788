"""How a config field is declared: its default, one line of documentation, a range check.

Its own module so that config sections can live beside the code they configure (a method's
section in ``rsc_dist.methods``) without importing ``rsc_dist.config``, which imports them.
"""

from __future__ import annotations

from dataclasses import field


def setting(default, doc: str, *, check: str | None = None):
    """A config field: its default, one line of documentation, and an optional range check.

    ``check``: "fraction" (0 <= x <= 1), "positive" (x >= 1) or "nonnegative" (x >= 0); choices
    come from the field's ``Literal`` type. ``--help`` prints every field from these.
    """
    metadata = {"doc": doc, "check": check}
    if isinstance(default, (dict, list)):  # mutable: each instance gets its own copy
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls):
    return field(default_factory=cls)
