"""What ends a command with one line naming the file, key or value at fault, and exit 2.

``UsageError`` is the base: bad input a user can fix (a config key, a shard, a checkpoint, a
device request, a sweep file). The commands catch it, print ``PROG: error: MESSAGE`` and exit
with ``contracts.EXIT_CONFIG``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input the user can fix; the message names the file, key or value at fault."""


class ConfigError(UsageError):
    """A config problem, with the key (and file) at fault in the message."""
