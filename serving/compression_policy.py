"""The operator's compression policy: what a request that does not say how to compress gets.

Services take `--default-compression METHOD`, `--default-retention R|auto` and
`--default-quality-target T` (KVFERRY_DEFAULT_COMPRESSION, ...). The policy fills what a request
leaves unset: a request with no compression settings is compressed by the policy's method at its
retention; one that names a method but no budget (retention, auto_retention, keep_tokens) gets the
policy's retention, one with a budget but no method the policy's method; an unset quality target
takes the policy's. A request with `method="none"` opts out. A policy with neither a method nor a
retention (the default), or with `--default-compression none`, leaves requests alone: they keep their
whole cache unless they ask for compression.

The coordinator applies its policy to every request it routes; a prefill node applies its own to
requests that reach it still without settings (from a coordinator without a policy, or called
directly). Torch-free (the coordinator uses it); the retention rules are engine/retention.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvferry.engine.errors import require
from kvferry.engine.retention import AUTO, check_quality_target, parse_retention


@dataclass(frozen=True)
class CompressionPolicy:
    method: str | None = None  # None: the engine's default method (compactor) when a retention is set
    retention: float | str | None = None  # a number in (0, 1] or "auto"; None: the engine's default
    quality_target: float | None = None

    @classmethod
    def from_settings(
        cls, method: str | None, retention: str | None, quality_target: float | None
    ) -> CompressionPolicy:
        """From the services' default_* settings, checked; errors name the setting."""
        method = (method or "").strip() or None
        ratio = (
            None
            if retention is None or not retention.strip()
            else parse_retention(retention, "default_retention")
        )
        require(
            not (method == "none" and ratio is not None),
            "default_retention",
            "contradicts --default-compression none (which keeps every request's whole cache)",
        )
        if quality_target is not None:
            check_quality_target(quality_target, "default_quality_target")
        if method == "none":
            method = None  # keeping the whole cache is what a request without settings gets anyway
        return cls(method, ratio, quality_target)

    @property
    def compresses(self) -> bool:
        return self.method is not None or self.retention is not None

    def apply(self, request: Any) -> None:
        """Fill the unset compression settings of a request message (GenerateRequest,
        GenerateUnaryRequest, PrefillRequest) in place."""
        if not self.compresses and self.quality_target is None:
            return
        if _names_a_put_context(request):
            return  # compressed as the context was put (a request on it may not set compression)
        if not request.HasField("compression"):
            if not self.compresses:
                return  # a quality target alone asks for no compression
            request.compression.SetInParent()
        msg = request.compression
        if msg.method == "none":
            return
        if not msg.method and self.method is not None:
            msg.method = self.method
        budget_set = msg.HasField("retention") or msg.auto_retention or msg.HasField("keep_tokens")
        if not budget_set and self.retention is not None:
            if self.retention == AUTO:
                msg.auto_retention = True
            else:
                msg.retention = float(self.retention)
        if not msg.HasField("quality_target") and self.quality_target is not None:
            msg.quality_target = self.quality_target

    def describe(self) -> str:
        if not self.compresses:
            return "none (requests keep their whole cache unless they ask for compression)"
        target = "" if self.quality_target is None else f", quality target {self.quality_target}"
        return f"{self.method or 'compactor'} at retention {self.retention or 'default'}{target}"


def _names_a_put_context(request: Any) -> bool:
    """Whether a request names a PutContext handle as its context."""
    return (
        "context" in request.DESCRIPTOR.fields_by_name
        and request.HasField("context")
        and request.context.WhichOneof("source") == "handle"
    )
