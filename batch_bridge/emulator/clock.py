"""The emulated clock: real time stretched by `time_scale`, continuous across restarts.

Every time the API shows (`created_at`, `expires_at`, `ended_at`, `archived_at`) lives on this
timeline, so `--time-scale 3600` makes a 24 h expiry happen after 24 real seconds. The anchor
(emulated time at a known real time) is saved in the state dir, so a restarted emulator
continues where it stopped instead of jumping back to the real date.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable


class Clock:
    """Emulated epoch seconds = anchor_emulated + (real - anchor_real) * scale."""

    def __init__(
        self,
        scale: Callable[[], float],
        anchor_path: Path | None = None,
        real_time: Callable[[], float] = time.time,
    ) -> None:
        # `scale` is read on every call so a runtime config change takes effect; a change
        # re-anchors first, so emulated time never jumps.
        self._scale_source = scale
        self._real_time = real_time
        self._anchor_path = anchor_path
        self._lock = threading.Lock()
        real = real_time()
        self._scale = float(scale())
        self._anchor_real = real
        self._anchor_emulated = real
        if anchor_path is not None and anchor_path.exists():
            saved = json.loads(anchor_path.read_text())
            self._anchor_emulated = saved["anchor_emulated"] + (real - saved["anchor_real"]) * saved["scale"]
        self._save()

    def now(self) -> float:
        """Current emulated time, epoch seconds."""
        with self._lock:
            real = self._real_time()
            scale = float(self._scale_source())
            if scale != self._scale:
                self._anchor_emulated += (real - self._anchor_real) * self._scale
                self._anchor_real = real
                self._scale = scale
                self._save()
            return self._anchor_emulated + (real - self._anchor_real) * self._scale

    def real_seconds(self, emulated_seconds: float) -> float:
        """How many real seconds an emulated duration takes at the current scale."""
        return emulated_seconds / self._scale if self._scale > 0 else float("inf")

    def _save(self) -> None:
        if self._anchor_path is None:
            return
        tmp = self._anchor_path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"anchor_emulated": self._anchor_emulated, "anchor_real": self._anchor_real, "scale": self._scale})
        )
        os.replace(tmp, self._anchor_path)
