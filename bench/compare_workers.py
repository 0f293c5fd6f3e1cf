"""Worker-side code of ``bench/compare.py``: digits-mlp in Celery and Dask workers.

Each worker process loads one onnxruntime session (one thread, as an agent slot does)
on its first task and keeps it. The Celery app is configured from the environment
(``COMPARE_REDIS_URL``), so ``celery -A bench.compare_workers worker`` finds it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_mlp.onnx"
_session: list[ort.InferenceSession] = []


def infer(x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """digits-mlp on ``x``: {"label": ..., "probabilities": ...}."""
    if not _session:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        _session.append(
            ort.InferenceSession(str(MODEL), sess_options=so, providers=["CPUExecutionProvider"])
        )
    sess = _session[0]
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x}), strict=True))


def celery_app(url: str | None = None) -> Any:
    """The Celery app: Redis (``url``, else ``$COMPARE_REDIS_URL``) as broker and result
    backend, pickled numpy arrays."""
    from celery import Celery  # type: ignore[import-untyped, import-not-found, unused-ignore]

    url = url or os.environ.get("COMPARE_REDIS_URL", "redis://127.0.0.1:6379")
    app = Celery("edge_offload_compare", broker=f"{url}/0", backend=f"{url}/1")
    app.conf.update(
        task_serializer="pickle",
        result_serializer="pickle",
        accept_content=["pickle"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_prefetch_multiplier=4,
    )
    app.task(name="infer")(infer)
    return app


if os.environ.get("COMPARE_REDIS_URL"):  # in a Celery worker, and in the comparison's client
    app = celery_app()
