"""Execution providers: advertise only those that pass a real probe inference."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

# y = x + x on a float32 [1, 4] tensor (89 bytes, built with onnx.helper).
PROBE_MODEL = Path(__file__).with_name("probe.onnx")


def probe(provider: str) -> str | None:
    """Run the probe model on ``provider`` alone; return why it failed, or None if it works.

    onnxruntime silently falls back to the CPU when a provider cannot be initialised (a
    CUDA build without a GPU, a missing TensorRT library), so the session's effective
    provider list is checked too, not just the absence of an exception.
    """
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        session = ort.InferenceSession(str(PROBE_MODEL), sess_options=so, providers=[provider])
        if session.get_providers()[0] != provider:
            return f"session fell back to {session.get_providers()}"
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        (y,) = session.run(["y"], {"x": x})
        if not np.array_equal(y, x + x):
            return f"wrong probe output {y!r}"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def usable_providers(preferred: tuple[str, ...] = ()) -> list[str]:
    """Providers that pass the probe, in preference order (``preferred`` first, CPU last)."""
    available = ort.get_available_providers()
    order = [p for p in preferred if p in available]
    order += [p for p in available if p not in order and p != "CPUExecutionProvider"]
    order.append("CPUExecutionProvider")
    usable = []
    for p in order:
        why = probe(p)
        if why is None:
            usable.append(p)
        else:
            logger.info("execution provider %s not advertised: %s", p, why)
    return usable
