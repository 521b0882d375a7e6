"""Exception types the CLI turns into one-line messages (exit code 2)."""


class AthweError(Exception):
    """Base class for user-facing errors: bad input, bad config, missing artefacts."""


class DataError(AthweError):
    """A data file is missing or malformed. The message names the file and the problem."""


class ConfigError(AthweError):
    """A config file or override is invalid (unknown key, wrong type, unknown model)."""


class FeatureError(AthweError):
    """Item features are missing, incomplete, misaligned, or a feature model cannot be loaded."""


class UnknownTokenError(AthweError):
    """A user or item token that the run does not know (a server answers it with 404)."""


def brief(e: BaseException) -> str:
    """The first sentence of an exception's message (its type name when it has none), for the
    one-line errors that wrap a library's multi-line exception."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__
