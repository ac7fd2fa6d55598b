"""One exception hierarchy for the whole project; messages say what to fix."""


class FedLLMError(Exception):
    """Base class of every error fedllm raises on purpose."""


class ConfigError(FedLLMError):
    """A configuration value is missing, malformed or inconsistent."""


class DataError(FedLLMError):
    """Input data cannot be read or does not have the expected shape."""


class PrivacyPlanError(FedLLMError):
    """No DP-SGD schedule can meet the requested privacy budget."""


class ModelError(FedLLMError):
    """Model or adapter weights do not fit the model the config builds (names, shapes, trainable set)."""


class UpdateRejected(FedLLMError):
    """A client reply failed validation and was excluded from aggregation."""


class LedgerError(FedLLMError):
    """A persisted privacy ledger or checkpoint cannot be read; it is never reset silently."""


class IntegrityError(LedgerError):
    """A saved file failed its checksum, or cannot be decrypted with the given key."""
