"""One error hierarchy for batch_bridge.

Only `cli.py` turns these into messages and exit codes. Every class says whether retrying the same
command later can help (`transient`), so schedulers and our own retry loops never match on names.

    BatchBridgeError
    ├── ConfigError            bad flag, environment variable, profile or project (terminal)
    │   ├── JobDefinitionError job YAML under meta.batch_bridge is invalid (terminal)
    │   └── PreflightRefused   the API would refuse every request of a job (model, limits, schema); nothing sent
    │       └── UnknownModel   the job's model is not one the Models API knows (with a did-you-mean)
    ├── WarehouseError         the warehouse or staging relation can't be read
    │   └── WarehouseLocked    another process (usually dbt) holds the file (transient)
    ├── StateError             the bridge's own state file is unusable
    │   ├── StateLocked        another batch-bridge process is working on this project (transient)
    │   └── InvalidStateTransition  a named state change was asked from the wrong state (terminal)
    ├── BudgetExceeded         the estimate is above the budget; nothing was sent (terminal)
    ├── ApiError               the Batches API refused or failed (transient unless said otherwise)
    │   ├── ApiAccountError    the account cannot do this: billing, permission, a model or endpoint it
    │   │   │                  cannot see (terminal until fixed; the rows stay sendable)
    │   │   └── ApiAuthError   bad or missing key (terminal)
    │   └── ApiRequestRejected 4xx for our request, e.g. a 400 on create (terminal)
    │       └── CreateRejected creates the API rejected for good: their rows are recorded with its message
    ├── ResultsError           a results download or file is incomplete or malformed (transient)
    └── WaitTimeout            `wait --timeout` elapsed with batches still in progress (transient)
"""

from __future__ import annotations


class BatchBridgeError(Exception):
    """Base class. `transient` tells whether retrying later can help."""

    transient: bool = False
    exit_code: int = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(BatchBridgeError):
    exit_code = 2


class JobDefinitionError(ConfigError):
    """A job's YAML is invalid. The message names the job, the field, the value and what is allowed."""

    def __init__(self, job: str, field: str, value: object, allowed: str, *, hint: str | None = None):
        self.job, self.field, self.value, self.allowed = job, field, value, allowed
        super().__init__(
            f"job {job!r}: meta.batch_bridge.{field} = {value!r} is not valid; allowed: {allowed}",
            hint=hint,
        )


class PreflightRefused(ConfigError):
    """A job's requests would all fail (retired model, no batch support, max_tokens, schema): nothing was sent."""


class UnknownModel(PreflightRefused):
    """The Models API does not know the job's model; the hint suggests the closest one it lists."""


class WarehouseError(BatchBridgeError):
    exit_code = 1


class WarehouseLocked(WarehouseError):
    transient = True
    exit_code = 4


class StateError(BatchBridgeError):
    pass


class StateLocked(StateError):
    transient = True
    exit_code = 4


class InvalidStateTransition(StateError):
    def __init__(self, what: str, ident: str, current: str, wanted: str, allowed_from: tuple[str, ...]):
        super().__init__(
            f"{what} {ident}: cannot move from {current!r} to {wanted!r} "
            f"(allowed only from {', '.join(repr(a) for a in allowed_from)})"
        )


class BudgetExceeded(BatchBridgeError):
    exit_code = 5


class ApiError(BatchBridgeError):
    transient = True
    exit_code = 1


class ApiAccountError(ApiError):
    transient = False


class ApiAuthError(ApiAccountError):
    transient = False


class ApiRequestRejected(ApiError):
    transient = False


class CreateRejected(ApiRequestRejected):
    """Raised by the CLI after a command whose other work went on: exit 1 for that run only."""


class OutOfMemory(BatchBridgeError):
    """DuckDB needed more than BATCH_BRIDGE_MEMORY_LIMIT for work it cannot spill to disk."""


class ResultsError(BatchBridgeError):
    transient = True


class WaitTimeout(BatchBridgeError):
    transient = True
    exit_code = 3
