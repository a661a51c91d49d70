"""Fault decisions: which request gets which injected failure.

Per-request outcomes (errored/expired) are a pure function of (seed, custom_id), so a test
is reproducible. HTTP-level faults consume counters in `Faults` (the next N requests), or
draw from a seeded random generator for the `http_error_fraction` knob.
"""

from __future__ import annotations

import random
import threading
import time

from .config import BATCH_ENDPOINTS, EmulatorConfig, Endpoint, Faults
from .ids import fraction

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_MESSAGES = {
    429: "This request would exceed your account's rate limit. Please try again later.",
    529: "Overloaded",
    500: "Internal server error",
}


def error_type_for(status: int) -> str:
    return _ERROR_TYPES.get(status, "api_error")


def message_for(status: int) -> str:
    return _MESSAGES.get(status, f"Injected HTTP {status} (emulator fault)")


class FaultState:
    """The mutable bits of fault handling: counters consumed per request, per-batch 404 counts."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._rng = random.Random(config.faults.seed)
        self._not_found_calls: dict[str, int] = {}

    @property
    def faults(self) -> Faults:
        # Read through the config each time: a test may replace `config.faults` wholesale.
        return self._config.faults

    @staticmethod
    def _applies(endpoints: tuple[Endpoint, ...], endpoint: Endpoint) -> bool:
        return endpoint in (endpoints or BATCH_ENDPOINTS)

    def take_connection_reset(self, endpoint: Endpoint) -> bool:
        with self._lock:
            f = self.faults
            if f.connection_resets != 0 and self._applies(f.connection_reset_endpoints, endpoint):
                if f.connection_resets > 0:
                    f.connection_resets -= 1
                return True
            return False

    def take_http_error(self, endpoint: Endpoint) -> int | None:
        """Status of an injected error for this request, or None."""
        with self._lock:
            f = self.faults
            if not self._applies(f.http_error_endpoints, endpoint):
                return None
            if f.http_errors:
                return f.http_errors.pop(0)
            if f.http_error_fraction > 0 and self._rng.random() < f.http_error_fraction:
                return f.http_error_status
            return None

    def take_slow_create(self) -> float:
        with self._lock:
            f = self.faults
            if f.slow_create_seconds <= 0 or f.slow_create_times == 0:
                return 0.0
            if f.slow_create_times > 0:
                f.slow_create_times -= 1
            return f.slow_create_seconds

    def take_create_error_after_store(self) -> int | None:
        with self._lock:
            f = self.faults
            return f.create_errors_after_store.pop(0) if f.create_errors_after_store else None

    def take_results_cut(self) -> int | None:
        with self._lock:
            f = self.faults
            if f.results_cut_after_bytes is None or f.results_cut_times == 0:
                return None
            if f.results_cut_times > 0:
                f.results_cut_times -= 1
            return f.results_cut_after_bytes

    def transient_not_found(self, batch_id: str, created_real: float) -> bool:
        """Whether this retrieve/results call of a young batch should answer 404."""
        with self._lock:
            f = self.faults
            young = max(f.not_found_first_seconds, f.propagation_seconds)
            if young > 0 and time.time() - created_real < young:
                return True
            if f.not_found_first_calls > 0:
                calls = self._not_found_calls.get(batch_id, 0)
                if calls < f.not_found_first_calls:
                    self._not_found_calls[batch_id] = calls + 1
                    return True
            return False

    def request_outcome(self, custom_id: str) -> str | None:
        """'expired', an errored error type, or None: a pure function of (seed, custom_id)."""
        return request_outcome(self.faults, custom_id)


def request_outcome(f: Faults, custom_id: str) -> str | None:
    """'expired', an errored error type, or None for one request under the fault knobs `f`."""
    if f.expired_fraction > 0 and fraction(f.seed, "expired", custom_id) < f.expired_fraction:
        return "expired"
    if f.errored_fraction > 0 and fraction(f.seed, "errored", custom_id) < f.errored_fraction:
        types = f.errored_types or ("overloaded_error",)
        return types[int(fraction(f.seed, "errored-type", custom_id) * len(types))]
    return None
