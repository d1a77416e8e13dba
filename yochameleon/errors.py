"""Exception types shared across yochameleon.

Every error a user can trigger with bad input derives from :class:`YoChameleonError`, so
callers (the CLI included) can report it cleanly without a traceback.
"""


class YoChameleonError(Exception):
    """Base class for user-facing errors."""


class ConfigError(YoChameleonError):
    """A recipe, override or option is invalid."""


class ConceptError(YoChameleonError):
    """A concept name, spec or concept file is invalid or cannot be attached."""


class TokenBudgetError(ConceptError):
    """More concept tokens were requested than free token ids remain."""


class IncompatibleBaseModelError(ConceptError):
    """A concept file was made for another base model."""


class DataError(YoChameleonError):
    """Concept photos or training data are missing, corrupt or insufficient."""


class BackendError(YoChameleonError):
    """A model cannot be loaded or does not support the requested operation."""


class TrainingError(YoChameleonError):
    """Training cannot continue (non-finite loss, locked run directory, changed recipe on resume)."""
