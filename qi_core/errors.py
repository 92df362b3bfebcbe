"""Typed errors. Each says what was wrong, with the numbers, and how to fix it."""

from __future__ import annotations

import difflib


class QiError(Exception):
    """Base class of every error qi raises on purpose."""


class InvalidInputError(QiError, ValueError):
    """A call argument is out of range or has the wrong type."""


class ImageReadError(InvalidInputError):
    """An input image or mask could not be read as an image."""


class OutputPathError(InvalidInputError):
    """An output path cannot be written: a folder, a read-only location or a wrong file suffix."""


class UnknownNameError(QiError, KeyError):
    """A name (pipeline, scheduler, part, adapter, policy) is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        close = difflib.get_close_matches(name, self.known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(self.known) if self.known else "(none registered)"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing}.")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class UnavailableNameError(UnknownNameError):
    """A name is provided by an installed plugin that is not loaded (e.g. one of its requirements is disabled)."""

    def __init__(self, kind: str, name: str, known: list[str], plugin: str, reason: str):
        super().__init__(kind, name, known)
        self.plugin, self.reason = plugin, reason
        self.args = (
            f"{kind} {name!r} is provided by plugin {plugin!r}, which is not loaded: {reason}. "
            "See `qi plugins`.",
        )


class RegistrationError(QiError):
    """A plugin registered something invalid or a name that is already taken."""


class ModelLoadError(QiError):
    """A model folder, file or weight does not match what the model expects."""


class MissingComponentError(ModelLoadError):
    """A component folder of the official layout is missing."""


class WeightMismatchError(ModelLoadError):
    """A checkpoint misses a key, has an unexpected one, or a tensor of the wrong shape."""


class DownloadError(ModelLoadError):
    """A model could not be fetched from a hub."""


class PluginError(QiError):
    """A plugin failed to load or declared an incompatible hook API."""
