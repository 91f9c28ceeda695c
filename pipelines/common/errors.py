"""The errors a user can cause. The CLI prints any :class:`UserError` as one line and exits with 2.

Each stage raises the subclass that names its concern; the built-in bases (``ValueError`` for bad
input, ``RuntimeError`` for a run that cannot finish) stay so that callers may catch those too.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad params, bad data, an unreachable store); the message says how."""


class ParamsError(UserError, ValueError):
    """A missing, mistyped or unknown setting in params.yaml or a ``--set`` override."""


class DataError(UserError, ValueError):
    """The data set cannot be read or prepared (missing files, bad shapes, no prepared data)."""


class TrainingError(UserError, RuntimeError):
    """The job could not run or finish; the message says why (resources, MLflow, a worker error)."""


class EvaluationError(UserError, RuntimeError):
    """The evaluation cannot run (no trained model, a classifier for other data)."""


class RegistryError(UserError, RuntimeError):
    """The registry refused (no such model or version, no metric to compare, an unreachable store)."""
