"""Errors the core raises to its callers (REST API, console, CLI). Each message says what to do."""

from __future__ import annotations


class CoreError(Exception):
    """Base class; `status` is the HTTP status the REST API answers with."""

    status = 500


class NotFound(CoreError):
    status = 404


class Conflict(CoreError):
    status = 409


class InvalidRequest(CoreError):
    status = 400


class Unavailable(CoreError):
    status = 503


class UpstreamFailed(CoreError):
    """A proplet answered with an error (an invocation failed)."""

    status = 502


class TimedOut(CoreError):
    status = 504
