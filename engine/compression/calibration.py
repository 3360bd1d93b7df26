"""Context-calibrated retention (`retention="auto"`): the smallest share of the prompt's KV expected to
keep a share `quality_target` of the full cache's quality, chosen per request from the context itself.

The model is the Compactor paper's. Quality relative to the full cache at retention r follows

    f(r) = (e^{b(r-1)} - e^{-b}) / (1 - e^{-b})      (f(0) = 0, f(1) = 1; f(r) = r at b = 0)

with b = alpha * NLL(c) + beta, NLL(c) being the model's mean next-token negative log-likelihood on
the context c (nats). A predictable context (low NLL: repetition, boilerplate) has b well below 0 and
f rises fast, so a small cache keeps most of the quality; a surprising one (dense facts, ids) has
b >= 0 and needs most of its cache. Solving f(r*) = tau:

    r* = 1 + ln(tau + (1 - tau) e^{-b}) / b          (r* = tau at b = 0)

clamped to the fit's [min_retention, max_retention].

The signal, `ContextNLL`, is measured during chunked prefill at a small cost: the lm_head on one
prompt position in 16 (at least MIN_SAMPLES and at most MAX_SAMPLES per prompt), summed on the device and read once when the
prefill ends, which is when the budget is decided (before select-and-pack).

Fits ship as JSON files in `calibrations/` (package data), one per model, keyed by
`LoadedModel.weights_key`, with one entry per compression method (see `save_fit`), and one per
method for compression without the question in view (`<method>@context`: a cached context, or a
prompt whose end is not protected; such compression loses more, so its curve is fitted apart). A model or method
without a fit gets `DEFAULT_CALIBRATION`: not fitted, deliberately conservative (never below half the
cache; 0.95 of it and more for text of 3 nats and up, as a small model reads ordinary prose). Fitting is `fit_calibration`,
called by the benchmark's fit script on its tuning split.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvferry.engine.retention import check_quality_target
from kvferry.engine.uploads import upload_values

log = logging.getLogger(__name__)

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibrations"
SAMPLE_STRIDE = 16  # one position in 16: ~1.3% of SmolLM2's prefill FLOPs, ~0.4% of an 8B model's
MIN_SAMPLES = 128  # shorter prompts sample more densely: one token's NLL varies by several nats
MAX_SAMPLES = 2048  # longer prompts sample more sparsely: the estimate needs no more
SAMPLE_SEED = 0
LOGITS_ROWS = 128  # lm_head rows per call: bounds the transient [rows, vocab] float32 logits


def retention_curve(retention: float, b: float) -> float:
    """f(r): expected quality relative to the full cache at retention r for curve parameter b."""
    if abs(b) < 1e-9:
        return retention
    if b < 0:  # expm1 keeps both ends exact; e^{-b} would overflow for very negative b
        return math.expm1(b * retention) / math.expm1(b)
    return math.exp(b * (retention - 1)) * math.expm1(-b * retention) / math.expm1(-b)


def retention_for_quality(target: float, b: float) -> float:
    """r* with f(r*) = target, in [0, 1]."""
    if target >= 1.0:
        return 1.0
    if abs(b) < 1e-9:
        return target
    # ln(tau + (1 - tau) e^{-b}) as a log-sum-exp: finite for any b
    x, y = math.log(target), math.log1p(-target) - b
    top = max(x, y)
    log_mix = top + math.log(math.exp(x - top) + math.exp(y - top))
    return min(1.0, max(0.0, 1.0 + log_mix / b))


@dataclass(frozen=True)
class Calibration:
    """One model's curve for one compression method: b = alpha * NLL + beta."""

    alpha: float
    beta: float
    min_retention: float = 0.05  # the choice is clamped to [min_retention, max_retention]
    max_retention: float = 1.0
    source: str = "default"  # where the parameters come from (a fit file, or "default")

    def curve_b(self, nll: float) -> float:
        return self.alpha * nll + self.beta

    def expected_quality(self, retention: float, nll: float) -> float:
        return retention_curve(retention, self.curve_b(nll))

    def choose(self, nll: float | None, quality_target: float) -> float:
        """The retention for a context of mean NLL `nll` (None: not measured, e.g. a 1-token prompt)."""
        check_quality_target(quality_target)
        if nll is None or not math.isfinite(nll):
            return self.max_retention
        r = retention_for_quality(quality_target, self.curve_b(nll))
        return min(self.max_retention, max(self.min_retention, r))


# Not fitted: a hand-set curve that errs toward keeping. At tau = 0.95 it keeps 0.95 of the cache at an
# NLL of 3 nats and more above (dense facts, ids; SmolLM2 reads the bundled prose at ~3.1), 0.82 at 2
# nats, 0.58 at 1 nat, and half the cache, its floor, below ~0.7 nats (repetitive text).
DEFAULT_CALIBRATION = Calibration(alpha=2.5, beta=-7.5, min_retention=0.5, max_retention=1.0)
CONTEXT_SUFFIX = "@context"  # a fit file's entry for compression without the question (for_method)


@dataclass
class ModelCalibration:
    """The fits of one model, by method; methods without one get DEFAULT_CALIBRATION."""

    fits: dict[str, Calibration] = field(default_factory=dict)
    model: str = ""  # the fit file's description of the model

    def for_method(self, method: str, question_kept: bool = True) -> Calibration:
        """The curve for `method`. `question_kept`: the compressed tokens end with a protected question
        (the whole prompt is compressed with its question kept); False when the question is not among
        them (a cached context; a prompt whose end is not protected), which tolerates less
        compression: such requests use the method's `<method>@context` fit when the file has one."""
        if not question_kept and f"{method}{CONTEXT_SUFFIX}" in self.fits:
            return self.fits[f"{method}{CONTEXT_SUFFIX}"]
        return self.fits.get(method, DEFAULT_CALIBRATION)

    @classmethod
    def for_weights(cls, weights_key: str | None, folder: Path = CALIBRATION_DIR) -> ModelCalibration:
        """The fits shipped for the weights named `weights_key` (LoadedModel.weights_key), if any."""
        if weights_key is None or not folder.is_dir():
            return cls()
        for path in sorted(folder.glob("*.json")):
            entry = _read_fit_file(path)
            if entry is not None and entry.get("weights_key") == weights_key:
                fits = {m: _calibration(v, path) for m, v in entry.get("methods", {}).items()}
                return cls(fits, str(entry.get("model", "")))
        return cls()


def _read_fit_file(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a broken file costs its fits, never the engine
        log.warning("calibration file %s is unreadable (%s); ignoring it", path, e)
        return None
    return data if isinstance(data, dict) else None


def _calibration(values: dict[str, Any], path: Path) -> Calibration:
    return Calibration(
        alpha=float(values["alpha"]),
        beta=float(values["beta"]),
        min_retention=float(values.get("min_retention", DEFAULT_CALIBRATION.min_retention)),
        max_retention=float(values.get("max_retention", 1.0)),
        source=path.name,
    )


def save_fit(
    path: Path,
    weights_key: str,
    model: str,
    method: str,
    calibration: Calibration,
    details: dict[str, Any] | None = None,
) -> None:
    """Write (or update) a model's fit file: {"model", "weights_key", "methods": {method: {alpha, beta,
    min_retention, max_retention, details}}}. `details` records how the fit was made (data, loss...)."""
    data = _read_fit_file(path) if path.exists() else None
    if data is None or data.get("weights_key") != weights_key:
        data = {"model": model, "weights_key": weights_key, "methods": {}}
    values = {k: v for k, v in asdict(calibration).items() if k != "source"}
    data["methods"][method] = {**values, "details": details or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def fit_calibration(
    nll: Sequence[float],
    retention: Sequence[float],
    quality: Sequence[float],
    over_prediction_weight: float = 4.0,
    min_retention: float = 0.05,
    max_retention: float = 1.0,
) -> Calibration:
    """alpha, beta of the curve fitted to measurements: per (context, retention), the context's mean NLL
    and the quality relative to the full cache (e.g. a family's accuracy ratio). Squared error where
    predicting MORE quality than measured (the error that makes `auto` over-compress) weighs
    `over_prediction_weight` times as much as predicting less."""
    import numpy as np
    from scipy.optimize import minimize

    x, r, q = (np.asarray(v, dtype=np.float64) for v in (nll, retention, quality))
    if not (len(x) == len(r) == len(q)) or len(x) < 2:
        raise ValueError("fit_calibration needs equally long nll, retention and quality, at least 2 points")

    def loss(params: np.ndarray) -> float:
        b = params[0] * x + params[1]
        err = _curve_array(r, b) - q
        return float(np.mean(np.where(err > 0, over_prediction_weight, 1.0) * err**2))

    start = [DEFAULT_CALIBRATION.alpha, DEFAULT_CALIBRATION.beta]
    result = minimize(
        loss, start, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-8, "maxiter": 4000}
    )
    alpha, beta = (float(v) for v in result.x)
    return Calibration(alpha, beta, min_retention, max_retention, source="fit")


def _curve_array(r: Any, b: Any) -> Any:
    """retention_curve over numpy arrays (b per element)."""
    import numpy as np

    b = np.broadcast_to(b, r.shape).astype(np.float64)
    out = np.array(r, dtype=np.float64, copy=True)
    neg, pos = b < -1e-9, b > 1e-9
    out[neg] = np.expm1(b[neg] * r[neg]) / np.expm1(b[neg])
    out[pos] = np.exp(b[pos] * (r[pos] - 1)) * np.expm1(-b[pos] * r[pos]) / np.expm1(-b[pos])
    return out


def sample_stride(n: int) -> int:
    """One NLL sample per this many positions of an n-token prompt."""
    return max(min(SAMPLE_STRIDE, max(1, (n - 1) // MIN_SAMPLES)), -(-(n - 1) // MAX_SAMPLES))


class ContextNLL:
    """Mean next-token NLL of a prompt, estimated during its chunked prefill on one position drawn from
    every `stride` consecutive ones (each with a next token), summed on the device: one host read, when
    the prefill ends. Random within each stride, never every stride-th position: text with a period
    (tables, lists, records of one format) would alias a fixed stride onto the same few tokens (records
    of 16 tokens read 0.55 nats at a fixed stride of 16 against 1.59 over every position). The draw is
    seeded, so every process samples the same positions of the same prompt."""

    def __init__(self, prompt_token_ids: Sequence[int], device: torch.device) -> None:
        n = len(prompt_token_ids)
        self.stride = sample_stride(n)
        strata = -(-(n - 1) // self.stride)  # [i * stride, (i + 1) * stride) ∩ [0, n - 1)
        offsets = torch.randint(self.stride, (strata,), generator=torch.Generator().manual_seed(SAMPLE_SEED))
        positions = [p for p in (torch.arange(strata) * self.stride + offsets).tolist() if p < n - 1]
        self.positions = positions  # ascending, on the host
        self.count = len(positions)
        self.device_positions = upload_values(positions, torch.int64, device)  # [count]
        self.targets = upload_values([prompt_token_ids[p + 1] for p in positions], torch.int64, device)
        self.total = torch.zeros((), dtype=torch.float32, device=device)

    def observe(
        self, logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, start: int
    ) -> None:
        """hidden [T, hidden_size]: the final hidden states of prompt positions start..start+T-1;
        logits_of: the model's lm_head ([k, hidden_size] -> [k, vocab] float32)."""
        first = bisect.bisect_left(self.positions, start)
        end = bisect.bisect_left(self.positions, start + hidden.shape[0])
        for a in range(first, end, LOGITS_ROWS):
            b = min(a + LOGITS_ROWS, end)
            logits = logits_of(hidden[self.device_positions[a:b] - start])  # [b - a, vocab]
            picked = logits.gather(-1, self.targets[a:b, None])[:, 0]
            self.total += (torch.logsumexp(logits, dim=-1) - picked).sum()

    def mean(self) -> float | None:
        """The mean NLL in nats (a host sync), or None when the prompt has no sampled position."""
        return float(self.total) / self.count if self.count else None
