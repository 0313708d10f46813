"""Errors a user can act on. The CLI prints their message without a stack trace."""

from __future__ import annotations


class FeaturerecError(Exception):
    """Base class: the message names what was wrong and where."""


class DataError(FeaturerecError):
    """Input data is missing, empty or malformed."""


class SpecError(FeaturerecError):
    """A pipeline, deployment, monitoring or experiment spec is invalid."""


class ModelError(FeaturerecError):
    """A model artifact is missing, corrupt or unfit for the request."""
