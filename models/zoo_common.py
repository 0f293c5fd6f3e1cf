"""What every model of the zoo's build does alike (imported by build.py and its parts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import skl2onnx
import sklearn


def pin_metadata(
    model: onnx.ModelProto,
    *,
    graph_name: str,
    description: str,
    version: str,
    props: Iterable[tuple[str, str]],
) -> onnx.ModelProto:
    """Name the batch axis ``N``, pin every free-form metadata field (so that a rebuild is
    byte-identical), set ``props`` as the metadata, and check the model."""
    for value_info in [*model.graph.input, *model.graph.output]:
        value_info.type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.name = graph_name
    model.graph.doc_string = description
    model.doc_string = description
    model.producer_name = "edge-offload models/build.py"
    model.producer_version = f"skl2onnx-{skl2onnx.__version__}"
    model.domain = "org.edge-offload"
    model.model_version = int(version)
    del model.metadata_props[:]
    for key, value in props:
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def toolchain(target_opset: Mapping[str, int]) -> dict[str, Any]:
    """The versions a model was built with, for its manifest entry's ``build``."""
    return {
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "target_opset": dict(target_opset),
    }
