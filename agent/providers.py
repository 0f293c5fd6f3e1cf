"""Execution providers: advertise only those that pass a real probe inference."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

logger = logging.getLogger(__name__)

# y = x + x on a float32 [1, 4] tensor (89 bytes, built with onnx.helper).
PROBE_MODEL = Path(__file__).with_name("probe.onnx")


def probe(provider: str) -> str | None:
    """Run the probe model on ``provider``; return why it failed, or None if it works.

    onnxruntime silently falls back to the CPU when a provider cannot be initialised (a
    CUDA build without a GPU, a missing TensorRT library) or does not implement an operator
    (the Azure provider runs no standard ops), so an inference without an exception proves
    nothing. The probe therefore profiles the run and requires that the provider itself
    executed the node, and that the output is right.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="edge-offload-probe-") as tmp:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "probe")
            session = ort.InferenceSession(str(PROBE_MODEL), sess_options=so, providers=[provider])
            x = np.arange(4, dtype=np.float32).reshape(1, 4)
            (y,) = session.run(["y"], {"x": x})
            events = json.loads(Path(session.end_profiling()).read_text())
        if not np.array_equal(y, x + x):
            return f"wrong probe output {y!r}"
        ran_on = {e["args"].get("provider") for e in events if e.get("cat") == "Node"}
        if provider not in ran_on:
            return f"the probe ran on {sorted(p for p in ran_on if p)}, not on {provider}"
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
