"""The vibration-anomaly model: an ONNX feature graph and a Gaussian mixture of normal windows.

Imported by build.py. The model takes raw 100 Hz windows of 128 samples and computes,
inside ONNX, 26 features a vibration analyst would look at: level (log RMS), shape
(crest factor, kurtosis, skewness), the spectrum after mean removal and a Hann window
(DFT by MatMul with fixed cos/sin bases; log energy fraction in 11 bands; the sorted
log spectrum relative to its peak, which says how many strong lines there are wherever
the machine's speed puts them; spectral flatness), the same level and impulsiveness
figures for the second difference (which weights the high-frequency resonance band), and
how unevenly energy is spread over 16-sample blocks (onsets, bursts, a frozen sensor).

Two detectors score the features, both fitted on normal simulated windows only:
a scikit-learn StandardScaler + GaussianMixture (negative log-likelihood: unusual
combinations) and a per-feature range check (largest distance from the median in units
of the normal 0.05 %..99.95 % half-range: one feature far outside what any healthy
machine shows, which a 26-dimensional likelihood dilutes). Each is normalised by its
99.9th percentile on separate normal calibration windows, and the score is the larger
of the two divided by the 99.9th percentile of that maximum, so ``score > 1`` flags
roughly one normal window in a thousand.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import sklearn
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

MODELS_DIR = Path(__file__).resolve().parent
# The training data comes from this checkout's simulator, whatever edge-offload is installed.
sys.path.insert(0, str(MODELS_DIR.parent))

from zoo_common import model_entry, pin_metadata, session, toolchain  # noqa: E402

from coordinator.signals import (  # noqa: E402
    ANOMALY_KINDS,
    HOP,
    RATE_HZ,
    WINDOW,
    SensorStream,
    anomalous_windows,
    anomaly_overlap,
    normal_windows,
    schedule_anomalies,
)

MODEL_ID = "vibration-anomaly"
MODEL_VERSION = "1"
MODEL_FILE = "vibration_anomaly.onnx"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
OPSET = TARGET_OPSET[""]

# Simulator seeds of each data set; the tests use others.
SEED_TRAIN, SEED_CALIBRATE, SEED_EVAL_NORMAL, SEED_EVAL_ANOMALOUS, SEED_STREAM = (
    1001,
    1002,
    1003,
    1004,
    1005,
)
N_TRAIN = 24_000
PER_SENSOR = 4  # windows per simulated machine: 6,000 machines for training
N_CALIBRATE = 16_000
N_EVAL_NORMAL = 20_000
N_EVAL_PER_KIND = 500
MIN_INSIDE = 0.5  # an anomalous window lies at least half inside its anomaly
STREAM_SENSORS = 40
STREAM_DURATION_S = 300.0
DEBOUNCE = 2  # consecutive windows over the threshold that raise an alert
GMM_COMPONENTS = 8
RANDOM_STATE = 0
CALIBRATION_QUANTILE = 0.999
RANGE_QUANTILES = (0.0005, 0.5, 0.9995)
THRESHOLD = 1.0

EPS = 1e-3  # mm/s: below any real sensor's noise floor, keeps logs finite on a flat signal
# Log energy fractions of these DFT bin ranges [lo, hi) (0.78 Hz per bin at 100 Hz): the
# structural resonance range only. Bands below 20 Hz would mostly encode each machine's
# speed, which differs across the fleet; the orders below describe that range instead.
BAND_EDGES = (26, 33, 41, 50, 65)
SORTED_RANKS = (2, 4, 6, 9, 14, 20)
# Energy at these multiples of the running speed relative to 1x (order analysis). 1x is
# the strongest line in DFT bins ORDER_SEARCH [lo, hi) (2.3..10.2 Hz).
ORDERS = (0.5, 1.5, 2.0, 3.0)
ORDER_SEARCH = (3, 14)
BLOCK = 16
FEATURE_NAMES: tuple[str, ...] = (
    "log_rms",
    "log_crest",
    "log_kurtosis",
    "skewness",
    *(
        f"band_{lo * RATE_HZ / WINDOW:.1f}-{(hi - 1) * RATE_HZ / WINDOW:.1f}Hz"
        for lo, hi in itertools.pairwise(BAND_EDGES)
    ),
    *(f"sorted_spectrum_rank{r}" for r in SORTED_RANKS),
    "log_flatness",
    "block_rms_spread",
    "d2_log_rms_ratio",
    "d2_log_kurtosis",
    "d2_block_rms_spread",
    *(f"order_{o:g}x" for o in ORDERS),
)
N_FEATURES = len(FEATURE_NAMES)
N_BINS = WINDOW // 2  # bins 1..64; DC is removed with the mean

DESCRIPTION = (
    "Vibration anomaly detector for 100 Hz machine-vibration windows. Input 'window': "
    f"float32 [N, {WINDOW}] raw samples (mm/s) of one sensor. Outputs 'score' float32 "
    "[N, 1] (higher = more anomalous; > 1.0 is anomalous, about 0.1 % of normal windows) "
    "and 'is_anomaly' bool [N, 1] (score > 1.0). An ONNX feature graph (level, crest, "
    "kurtosis, skewness, Hann-windowed DFT resonance-band energies, sorted spectrum, "
    "flatness, second-difference and block statistics, 0.5x/1.5x/2x/3x order lines) "
    f"feed a StandardScaler + {GMM_COMPONENTS}-component GaussianMixture and a per-feature "
    "range check, both fitted on normal simulated windows only (coordinator/signals.py)."
)
SOURCE = "simulated by coordinator/signals.py, trained by models/build_vibration.py"
LICENCE = "Apache-2.0 (trained on data simulated by this project)"

SCORE_RTOL = 2e-3  # ONNX float32 vs the float64 reference, relative to max(1, |score|)

Array = np.ndarray[Any, Any]


class _GraphBuilder:
    """Nodes and float32/int64 constants of a hand-written ONNX graph, auto-named."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        return self.ops(op_type, *inputs, outs=[out] if out else None, n_out=1, **attrs)[0]

    def ops(
        self,
        op_type: str,
        *inputs: str,
        outs: list[str] | None = None,
        n_out: int = 1,
        **attrs: Any,
    ) -> list[str]:
        outputs = outs or [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outputs, name=self._name(op_type), **attrs)
        )
        return outputs


def _bases() -> tuple[Array, Array, Array, Array]:
    """Hann-windowed DFT basis [WINDOW, 2*N_BINS], power fold, band sums, second difference."""
    n = np.arange(WINDOW)
    k = np.arange(1, N_BINS + 1)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / WINDOW)
    arg = 2 * np.pi * np.outer(n, k) / WINDOW
    dft = np.concatenate([np.cos(arg), np.sin(arg)], axis=1) * hann[:, None]
    fold = np.concatenate([np.eye(N_BINS), np.eye(N_BINS)], axis=0)  # re^2 + im^2
    bands = np.zeros((N_BINS, len(BAND_EDGES) - 1))
    for j, (lo, hi) in enumerate(itertools.pairwise(BAND_EDGES)):
        bands[lo - 1 : hi - 1, j] = 1.0
    d2 = np.zeros((WINDOW, WINDOW - 2))
    for i in range(WINDOW - 2):
        d2[i : i + 3, i] = (1.0, -2.0, 1.0)
    return dft, fold, bands, d2


def reference_features(x: Array) -> Array:
    """The feature graph's computation in float64 numpy (what the ONNX graph is checked against)."""
    dft, fold, bands, d2m = _bases()
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=1, keepdims=True)
    var = (xc**2).mean(axis=1) + EPS**2
    lvar = np.log(var)
    f = [
        0.5 * lvar,
        np.log(np.abs(xc).max(axis=1) + EPS) - 0.5 * lvar,
        np.log((xc**4).mean(axis=1) + EPS**4) - 2 * lvar,
        (xc**3).mean(axis=1) / (var * np.sqrt(var)),
    ]
    p = ((xc @ dft) ** 2) @ fold + EPS**2
    log_total = np.log(p.sum(axis=1))
    f += list((np.log(p @ bands) - log_total[:, None]).T)
    lp = np.log(p)
    srt = -np.sort(-lp, axis=1)
    f += list((srt[:, list(SORTED_RANKS)] - srt[:, :1]).T)
    f.append(lp.mean(axis=1) - (log_total - np.log(N_BINS)))
    blk = np.log((xc.reshape(len(x), -1, BLOCK) ** 2).mean(axis=2) + EPS**2)
    f.append(0.5 * (blk.max(axis=1) - blk.min(axis=1)))
    d = xc @ d2m
    ldv = np.log((d**2).mean(axis=1) + EPS**2)
    f.append(0.5 * (ldv - lvar))
    f.append(np.log((d**4).mean(axis=1) + EPS**4) - 2 * ldv)
    n_blocks = (WINDOW - 2) // BLOCK
    dblk = np.log((d[:, : n_blocks * BLOCK].reshape(len(x), n_blocks, BLOCK) ** 2).mean(2) + EPS**2)
    f.append(0.5 * (dblk.max(axis=1) - dblk.min(axis=1)))
    # bin b is column b - 1 of p; a line's energy is that of its bin and both neighbours
    k1 = np.argmax(p[:, ORDER_SEARCH[0] - 1 : ORDER_SEARCH[1] - 1], axis=1) + ORDER_SEARCH[0]
    rows = np.arange(len(x))[:, None]

    def line(order: float) -> Array:
        b = np.clip(np.floor(order * k1 + 0.5), 2, N_BINS - 1).astype(np.int64)[:, None]
        return np.asarray(p[rows, b + np.array([-2, -1, 0])].mean(axis=1))

    base = np.log(line(1.0))
    f += [np.log(line(o)) - base for o in ORDERS]
    return np.stack(f, axis=1)


def feature_graph() -> onnx.ModelProto:
    """ONNX graph: ``window`` float32 [N, WINDOW] -> ``features`` float32 [N, N_FEATURES]."""
    g = _GraphBuilder("feat/")
    dft, fold, bands, d2m = _bases()

    def mean(x: str) -> str:
        return g.op("ReduceMean", x, axes=[1], keepdims=1)

    def log_plus(x: str, eps: float) -> str:
        return g.op("Log", g.op("Add", x, g.const("eps", eps)))

    half = g.const("half", 0.5)
    two = g.const("two", 2.0)
    xc = g.op("Sub", "window", mean("window"))
    sq = g.op("Mul", xc, xc)
    var = g.op("Add", mean(sq), g.const("eps2", EPS**2))
    lvar = g.op("Log", var)
    log_rms = g.op("Mul", lvar, half)
    log_crest = g.op(
        "Sub", log_plus(g.op("ReduceMax", g.op("Abs", xc), axes=[1], keepdims=1), EPS), log_rms
    )
    log_kurt = g.op("Sub", log_plus(mean(g.op("Mul", sq, sq)), EPS**4), g.op("Mul", lvar, two))
    skew = g.op("Div", mean(g.op("Mul", sq, xc)), g.op("Mul", var, g.op("Sqrt", var)))
    # power spectrum of bins 1..N_BINS: (x W)^2 folded re^2 + im^2, plus a floor
    y = g.op("MatMul", xc, g.const("dft", dft))
    power = g.op(
        "Add", g.op("MatMul", g.op("Mul", y, y), g.const("fold", fold)), g.const("eps2", EPS**2)
    )
    log_total = g.op("Log", g.op("MatMul", power, g.const("ones", np.ones((N_BINS, 1)))))
    band_frac = g.op("Sub", g.op("Log", g.op("MatMul", power, g.const("bands", bands))), log_total)
    log_power = g.op("Log", power)
    top, _ = g.ops(
        "TopK",
        log_power,
        g.const("k", [max(SORTED_RANKS) + 1], np.int64),
        n_out=2,
        axis=1,
        largest=1,
        sorted=1,
    )
    peak = g.op("Gather", top, g.const("rank0", [0], np.int64), axis=1)
    ranks = g.op("Gather", top, g.const("ranks", list(SORTED_RANKS), np.int64), axis=1)
    sorted_rel = g.op("Sub", ranks, peak)
    flatness = g.op(
        "Sub", mean(log_power), g.op("Sub", log_total, g.const("log_bins", math.log(N_BINS)))
    )

    def block_spread(sq_signal: str, n_blocks: int) -> str:
        """Half the log ratio of the largest to the smallest block mean square."""
        blocks = g.op("Reshape", sq_signal, g.const("shape", [-1, n_blocks, BLOCK], np.int64))
        lb = log_plus(g.op("ReduceMean", blocks, axes=[2], keepdims=0), EPS**2)
        spread = g.op(
            "Sub",
            g.op("ReduceMax", lb, axes=[1], keepdims=1),
            g.op("ReduceMin", lb, axes=[1], keepdims=1),
        )
        return g.op("Mul", spread, half)

    blocks_x = block_spread(sq, WINDOW // BLOCK)
    d = g.op("MatMul", xc, g.const("d2", d2m))
    dsq = g.op("Mul", d, d)
    ldv = log_plus(mean(dsq), EPS**2)
    d2_ratio = g.op("Mul", g.op("Sub", ldv, lvar), half)
    d2_kurt = g.op("Sub", log_plus(mean(g.op("Mul", dsq, dsq)), EPS**4), g.op("Mul", ldv, two))
    n_dblocks = (WINDOW - 2) // BLOCK
    dsq_head = g.op(
        "Slice",
        dsq,
        g.const("start", [0], np.int64),
        g.const("end", [n_dblocks * BLOCK], np.int64),
        g.const("axis", [1], np.int64),
    )
    blocks_d = block_spread(dsq_head, n_dblocks)
    orders = order_lines(g, power)
    g.op(
        "Concat",
        log_rms,
        log_crest,
        log_kurt,
        skew,
        band_frac,
        sorted_rel,
        flatness,
        blocks_x,
        d2_ratio,
        d2_kurt,
        blocks_d,
        orders,
        out="features",
        axis=1,
    )
    graph = helper.make_graph(
        g.nodes,
        "vibration_features",
        [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", WINDOW])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", N_FEATURES])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return model


def order_lines(g: _GraphBuilder, power: str) -> str:
    """Log energy of the ORDERS lines relative to 1x: [N, len(ORDERS)]."""
    lo, hi = ORDER_SEARCH
    search = g.op(
        "Slice",
        power,
        g.const("start", [lo - 1], np.int64),
        g.const("end", [hi - 1], np.int64),
        g.const("axis", [1], np.int64),
    )
    k1 = g.op(
        "Add",
        g.op("Cast", g.op("ArgMax", search, axis=1, keepdims=1), to=TensorProto.FLOAT),
        g.const("search_lo", float(lo)),
    )
    # bin of each order (1x first), rounded half up, kept where both neighbours exist
    bins = g.op(
        "Clip",
        g.op(
            "Floor",
            g.op("Add", g.op("Mul", k1, g.const("orders", [1.0, *ORDERS])), g.const("half", 0.5)),
        ),
        g.const("bin_lo", 2.0),
        g.const("bin_hi", float(N_BINS - 1)),
    )
    n_lines = len(ORDERS) + 1
    # columns b-2, b-1, b of the power spectrum (bins b-1, b, b+1)
    cols = g.op(
        "Add",
        g.op("Unsqueeze", g.op("Cast", bins, to=TensorProto.INT64), g.const("ax2", [2], np.int64)),
        g.const("neighbours", [[[-2, -1, 0]]], np.int64),
    )
    flat = g.op("Reshape", cols, g.const("shape", [-1, 3 * n_lines], np.int64))
    lines = g.op(
        "ReduceMean",
        g.op(
            "Reshape",
            g.op("GatherElements", power, flat, axis=1),
            g.const("shape", [-1, n_lines, 3], np.int64),
        ),
        axes=[2],
        keepdims=0,
    )
    log_lines = g.op("Log", lines)
    base = g.op("Gather", log_lines, g.const("col0", [0], np.int64), axis=1)
    rest = g.op("Gather", log_lines, g.const("cols", list(range(1, n_lines)), np.int64), axis=1)
    return g.op("Sub", rest, base)


class FeatureExtractor:
    """Runs the ONNX feature graph, so training sees exactly the features serving computes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._sess = session(model.SerializeToString(deterministic=True))

    def __call__(self, windows: Array) -> Array:
        (out,) = self._sess.run(["features"], {"window": np.ascontiguousarray(windows)})
        return np.asarray(out)


def fit_gmm(features: Array) -> Pipeline:
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "gmm",
                GaussianMixture(
                    n_components=GMM_COMPONENTS,
                    covariance_type="full",
                    max_iter=500,
                    random_state=RANDOM_STATE,
                ),
            ),
        ]
    )
    # One thread: multi-threaded BLAS / OpenMP reductions may change float summation order.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. ConvergenceWarning must not pass silently
        pipe.fit(features.astype(np.float64))
    return pipe


class Calibration:
    """Constants that turn (GMM log-likelihood, features) into the score."""

    def __init__(self, pipe: Pipeline, train: Array, calibrate: Array) -> None:
        self.pipe = pipe
        lo, med, hi = np.quantile(train.astype(np.float64), RANGE_QUANTILES, axis=0)
        self.median = med.astype(np.float32)
        self.half_range = ((hi - lo) / 2).astype(np.float32)
        nll, rng = self._parts(calibrate)
        self.nll_median = np.float32(np.median(nll))
        self.nll_scale = np.float32(np.quantile(nll, CALIBRATION_QUANTILE) - self.nll_median)
        self.range_scale = np.float32(np.quantile(rng, CALIBRATION_QUANTILE))
        self.final_scale = np.float32(1.0)
        self.final_scale = np.float32(np.quantile(self.score(calibrate), CALIBRATION_QUANTILE))

    def _parts(self, features: Array) -> tuple[Array, Array]:
        f = features.astype(np.float64)
        nll = -self.pipe.score_samples(f)
        rng = np.max(np.abs((f - self.median) / self.half_range), axis=1)
        return nll, rng

    def score(self, features: Array) -> Array:
        """The float64 reference of the ONNX score."""
        nll, rng = self._parts(features)
        combined = np.maximum((nll - self.nll_median) / self.nll_scale, rng / self.range_scale)
        return combined / float(self.final_scale)


def _prune(graph: onnx.GraphProto, outputs: list[str]) -> None:
    """Drop nodes and initializers that no graph output depends on."""
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def head_graph(cal: Calibration) -> onnx.ModelProto:
    """``features`` -> ``score`` [N, 1] and ``is_anomaly`` [N, 1]: sklearn's GMM + range check."""
    gmm = to_onnx(
        cal.pipe,
        initial_types=[("features", FloatTensorType([None, N_FEATURES]))],
        options={GaussianMixture: {"score_samples": True}},
        target_opset=TARGET_OPSET,
        name="vibration_gmm",
    )
    gmm = onnx.compose.add_prefix(gmm, "gmm/")
    g = _GraphBuilder("head/")
    scale = 1.0 / float(cal.final_scale)
    nll_part = g.op(
        "Mul",
        g.op("Sub", g.op("Neg", "gmm/score_samples"), g.const("nll_median", cal.nll_median)),
        g.const("nll_k", scale / float(cal.nll_scale)),
    )
    z = g.op(
        "Div",
        g.op("Sub", "features", g.const("median", cal.median)),
        g.const("half_range", cal.half_range),
    )
    range_part = g.op(
        "Mul",
        g.op("ReduceMax", g.op("Abs", z), axes=[1], keepdims=1),
        g.const("range_k", scale / float(cal.range_scale)),
    )
    g.op("Max", nll_part, range_part, out="score")
    g.op("Greater", "score", g.const("threshold", THRESHOLD), out="is_anomaly")
    gmm_nodes = list(gmm.graph.node)
    for node in gmm_nodes:
        for i, name in enumerate(node.input):
            if name == "gmm/features":
                node.input[i] = "features"
    graph = helper.make_graph(
        [*gmm_nodes, *g.nodes],
        "vibration_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", N_FEATURES])],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("is_anomaly", TensorProto.BOOL, ["N", 1]),
        ],
        initializer=[*gmm.graph.initializer, *g.initializers],
    )
    _prune(graph, ["score", "is_anomaly"])
    return helper.make_model(graph, opset_imports=list(gmm.opset_import))


def export(cal: Calibration) -> onnx.ModelProto:
    model = onnx.compose.merge_models(
        feature_graph(),
        head_graph(cal),
        io_map=[("features", "features")],
        outputs=["score", "is_anomaly"],
    )
    # merge_models lists opsets in an order that varies from run to run (and twice)
    versions: dict[str, int] = {}
    for opset in model.opset_import:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    del model.graph.value_info[:]
    return pin_metadata(
        model,
        graph_name="vibration_anomaly",
        model_id=MODEL_ID,
        version=MODEL_VERSION,
        description=DESCRIPTION,
        source=SOURCE,
        licence=LICENCE,
        props=(
            ("scikit-learn", sklearn.__version__),
            ("features", ",".join(FEATURE_NAMES)),
            ("threshold", repr(THRESHOLD)),
        ),
    )


def verify(model_bytes: bytes, extractor: FeatureExtractor, cal: Calibration, x: Array) -> None:
    """ONNX features agree with the numpy reference, and the score with the float64 one."""
    feats = extractor(x)
    ref = reference_features(x)
    err = np.abs(feats - ref) / np.maximum(1.0, np.abs(ref))
    if not np.all(np.isfinite(feats)) or float(err.max()) > 1e-3:
        worst = FEATURE_NAMES[int(np.argmax(err.max(axis=0)))]
        raise SystemExit(f"ONNX features differ from numpy by {err.max():.3g} ({worst})")
    sess = session(model_bytes)
    if [i.name for i in sess.get_inputs()] != ["window"] or [
        o.name for o in sess.get_outputs()
    ] != ["score", "is_anomaly"]:
        raise SystemExit("unexpected ONNX signature")
    score, flag = sess.run(None, {"window": x})
    if score.dtype != np.float32 or score.shape != (len(x), 1) or flag.dtype != np.bool_:
        raise SystemExit(f"unexpected outputs {score.dtype} {score.shape}, {flag.dtype}")
    want = cal.score(feats)
    serr = np.abs(score[:, 0] - want) / np.maximum(1.0, np.abs(want))
    if float(serr.max()) > SCORE_RTOL:
        raise SystemExit(f"ONNX score differs from sklearn by {serr.max():.3g} > {SCORE_RTOL}")
    if not np.array_equal(flag[:, 0], score[:, 0] > THRESHOLD):
        raise SystemExit("is_anomaly disagrees with score > threshold")
    print(
        f"  verified on {len(x)} windows: features max rel err {err.max():.2g}, "
        f"score max rel err vs sklearn {serr.max():.2g}"
    )


def stream_windows(
    sensors: list[str], duration_s: float, seed: int
) -> tuple[Array, list[tuple[str, int, float, str]], list[Any]]:
    """Windows (WINDOW, hop HOP) of simulated streams with scheduled anomalies.

    Returns the windows, per window (sensor, index, fraction inside an anomaly, its kind or
    ""), and the schedule.
    """
    schedule = schedule_anomalies(sensors, duration_s, seed=seed)
    n = int(duration_s * RATE_HZ)
    starts = range(0, n - WINDOW + 1, HOP)
    windows = np.empty((len(sensors) * len(starts), WINDOW), dtype=np.float32)
    meta: list[tuple[str, int, float, str]] = []
    for s, sensor in enumerate(sensors):
        signal = SensorStream(sensor, seed=seed, anomalies=schedule).read(n)
        for j, w in enumerate(starts):
            windows[s * len(starts) + j] = signal[w : w + WINDOW]
            a, frac = anomaly_overlap(schedule, sensor, w / RATE_HZ, (w + WINDOW) / RATE_HZ)
            meta.append((sensor, j, frac, a.kind if a else ""))
    return windows, meta, schedule


def stream_figures(
    flags: Array, meta: list[tuple[str, int, float, str]], schedule: list[Any], duration_s: float
) -> dict[str, Any]:
    """Window recall / false-positive rate, and event recall with a debounce of DEBOUNCE."""
    inside = np.array([m[2] for m in meta])
    positive = inside >= MIN_INSIDE
    normal = inside == 0
    by_sensor: dict[str, list[int]] = {}
    for i, m in enumerate(meta):
        by_sensor.setdefault(m[0], []).append(i)
    detected = 0
    false_alerts = 0
    for sensor, rows in by_sensor.items():
        f = flags[rows]
        over = inside[rows] > 0
        run = 0
        for j in range(len(rows)):
            run = run + 1 if f[j] else 0
            if run == DEBOUNCE and not over[j - DEBOUNCE + 1 : j + 1].any():
                false_alerts += 1
        for a in schedule:
            if a.sensor != sensor:
                continue
            hit = [
                bool(f[j]) and a.overlap(j * HOP / RATE_HZ, (j * HOP + WINDOW) / RATE_HZ) > 0
                for j in range(len(rows))
            ]
            if any(all(hit[j : j + DEBOUNCE]) for j in range(len(hit) - DEBOUNCE + 1)):
                detected += 1
    hours = len(by_sensor) * duration_s / 3600
    return {
        "window_recall": round(float(flags[positive].mean()), 6),
        "window_false_positive_rate": round(float(flags[normal].mean()), 6),
        "events": len(schedule),
        "events_alerted": detected,
        "event_recall": round(detected / max(1, len(schedule)), 6),
        "false_alerts_per_sensor_hour": round(false_alerts / hours, 4),
    }


def build_vibration_anomaly(out_dir: Path) -> dict[str, Any]:
    extractor = FeatureExtractor(feature_graph())
    t0 = time.perf_counter()
    train = extractor(normal_windows(N_TRAIN, WINDOW, seed=SEED_TRAIN, per_sensor=PER_SENSOR))
    calibrate = extractor(
        normal_windows(N_CALIBRATE, WINDOW, seed=SEED_CALIBRATE, per_sensor=PER_SENSOR)
    )
    pipe = fit_gmm(train)
    cal = Calibration(pipe, train, calibrate)
    model_bytes = export(cal).SerializeToString(deterministic=True)
    path = out_dir / MODEL_FILE
    path.write_bytes(model_bytes)

    sess = session(model_bytes)

    def flags(x: Array) -> Array:
        (score,) = sess.run(["score"], {"window": x})
        return np.asarray(score[:, 0] > THRESHOLD)

    eval_normal = normal_windows(N_EVAL_NORMAL, WINDOW, seed=SEED_EVAL_NORMAL)
    eval_anom, kinds = anomalous_windows(
        N_EVAL_PER_KIND * len(ANOMALY_KINDS),
        WINDOW,
        seed=SEED_EVAL_ANOMALOUS,
        min_inside=MIN_INSIDE,
    )
    verify(model_bytes, extractor, cal, np.concatenate([eval_normal[:2000], eval_anom]))
    fpr = float(flags(eval_normal).mean())
    hit = flags(eval_anom)
    kind_arr = np.array(kinds)
    recall = {k: round(float(hit[kind_arr == k].mean()), 6) for k in ANOMALY_KINDS}
    sensors = [f"stream-{i:02d}" for i in range(STREAM_SENSORS)]
    windows, meta, schedule = stream_windows(sensors, STREAM_DURATION_S, SEED_STREAM)
    stream = stream_figures(flags(windows), meta, schedule, STREAM_DURATION_S)
    print(
        f"  {MODEL_FILE}: false positives {fpr:.4%} of {N_EVAL_NORMAL} normal windows; "
        f"recall {hit.mean():.4f} of {len(hit)} windows >= {MIN_INSIDE:.0%} inside; "
        f"streams: {stream['events_alerted']}/{stream['events']} events alerted, "
        f"{stream['false_alerts_per_sensor_hour']} false alerts/sensor-hour "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    for k, v in recall.items():
        print(f"    {k:<14} recall {v:.4f}")
    return model_entry(
        path,
        model_id=MODEL_ID,
        version=MODEL_VERSION,
        inputs=[{"name": "window", "dtype": "float32", "shape": [None, WINDOW]}],
        outputs=[
            {"name": "score", "dtype": "float32", "shape": [None, 1]},
            {"name": "is_anomaly", "dtype": "bool", "shape": [None, 1]},
        ],
        task="anomaly-detection",
        verdict={"output": "score", "threshold": THRESHOLD, "op": ">"},
        window={"size": WINDOW, "hop": HOP, "rate_hz": RATE_HZ, "unit": "mm/s"},
        description=DESCRIPTION,
        source=SOURCE,
        licence=LICENCE,
        build={
            **toolchain(TARGET_OPSET),
            "random_state": RANDOM_STATE,
            "gmm_components": GMM_COMPONENTS,
            "features": list(FEATURE_NAMES),
            "train_windows": N_TRAIN,
            "windows_per_machine": PER_SENSOR,
            "calibration_windows": N_CALIBRATE,
            "calibration_quantile": CALIBRATION_QUANTILE,
            "seeds": {
                "train": SEED_TRAIN,
                "calibrate": SEED_CALIBRATE,
                "eval_normal": SEED_EVAL_NORMAL,
                "eval_anomalous": SEED_EVAL_ANOMALOUS,
                "stream": SEED_STREAM,
            },
            "eval": {
                "normal_windows": N_EVAL_NORMAL,
                "false_positive_rate": round(fpr, 6),
                "anomalous_windows": len(hit),
                "min_inside": MIN_INSIDE,
                "recall": round(float(hit.mean()), 6),
                "recall_by_kind": recall,
            },
            "stream_eval": {
                "sensors": STREAM_SENSORS,
                "duration_s": STREAM_DURATION_S,
                "debounce": DEBOUNCE,
                **stream,
            },
        },
    )


def bench(batch: int = 64, rounds: int = 7) -> None:
    """onnxruntime CPU cost per window of the committed model (1 thread)."""
    sess = session((MODELS_DIR / MODEL_FILE).read_bytes())
    x = normal_windows(batch, WINDOW, seed=7)
    for _ in range(50):
        sess.run(None, {"window": x})
    times = []
    for _ in range(rounds):
        n = 200
        t0 = time.perf_counter()
        for _ in range(n):
            sess.run(None, {"window": x})
        times.append((time.perf_counter() - t0) / (n * batch) * 1e6)
    times.sort()
    print(
        f"{MODEL_ID}: batch {batch}, {times[0]:.2f} us/window best, "
        f"{times[len(times) // 2]:.2f} median"
    )
