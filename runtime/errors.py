"""The runtime's exception hierarchy.

Every error a caller can cause (a bad model file, a bad option) is a ``RuntimeInputError``;
anything else escaping the runtime is a bug. ``api/errors.py`` maps these to HTTP statuses.
"""

from __future__ import annotations


class RuntimeInputError(Exception):
    """Base for errors caused by input: model files, names, options, prompts."""


class ModelLoadError(RuntimeInputError):
    """A model could not be resolved or loaded. The message names the file and tensor."""


class ModelNotFoundError(ModelLoadError):
    """No model of that name or path exists."""


class PullError(RuntimeInputError):
    """A pull from a registry or the Hugging Face hub failed: the message says which model,
    which blob and why (and whether running the pull again resumes it)."""


class OptionsError(RuntimeInputError, ValueError):
    """A sampling or generation option is out of range or of the wrong type."""


class PromptError(RuntimeInputError, ValueError):
    """The prompt is empty or otherwise unusable."""


class PromptTooLongError(PromptError):
    """The prompt does not fit the context (HTTP 413)."""

    @classmethod
    def exceeding(cls, length: int, context: int) -> PromptTooLongError:
        return cls(f"input length ({length} tokens) exceeds the context length ({context} tokens)")


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc`` (itself, if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in exception_leaves(sub)]
    return [exc]
