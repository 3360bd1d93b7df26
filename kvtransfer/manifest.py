"""The KV manifest: what a decode node checks before it reserves pages and again before it writes them."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from kvferry.engine.errors import ResourceExhaustedError, require
from kvferry.engine.kv_handoff import ContextRef, KVLayout
from kvferry.kvtransfer.errors import ManifestMismatchError
from kvferry.v1 import kv_pb2

CHECKSUM_ALGORITHM = "crc32"  # of the bytes, as they stream (grpc)
DEVICE_CHECKSUM_ALGORITHM = "sum64"  # of the pages, where they are (direct transports: device_util)
CHECKSUM_ALGORITHMS = (CHECKSUM_ALGORITHM, DEVICE_CHECKSUM_ALGORITHM)
CODECS = ("none",)


def checksum(data: bytes | bytearray | memoryview, running: int = 0) -> int:
    """crc32 of `data`, continuing from `running` (so chunks can be summed as they arrive)."""
    return zlib.crc32(data, running)


@dataclass(frozen=True)
class ModelSpec:
    """What both ends must agree on for pages to be interchangeable."""

    fingerprint: str
    dtype: str  # "float32", "bfloat16", ...
    page_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    element_size: int

    @classmethod
    def of_engine(cls, engine: object) -> ModelSpec:
        pool = engine.pool  # type: ignore[attr-defined]
        return cls(
            fingerprint=engine.loaded.fingerprint,  # type: ignore[attr-defined]
            dtype=str(pool.kv.dtype).removeprefix("torch."),
            page_size=pool.page_size,
            num_layers=engine.num_layers,  # type: ignore[attr-defined]
            num_kv_heads=engine.num_kv_heads,  # type: ignore[attr-defined]
            head_dim=pool.head_dim,
            element_size=pool.kv.element_size(),
        )

    @property
    def bytes_per_page(self) -> int:
        return 2 * self.page_size * self.head_dim * self.element_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def build_manifest(
    spec: ModelSpec,
    layout: KVLayout,
    payload: bytes | bytearray | memoryview | torch.Tensor,
    with_checksum: bool = True,
) -> kv_pb2.KVManifest:
    """The manifest of `payload`: page bytes (checksum crc32, for grpc) or the pages themselves
    ([N, 2, page_size, head_dim], checksum sum64 computed where they live, for direct transports).
    `with_checksum=False` (direct transports): checksum 0, the sum64 comes with CommitKV instead."""
    if isinstance(payload, torch.Tensor):
        from kvferry.kvtransfer.device_util import page_checksum

        byte_count = payload.numel() * payload.element_size()
        value = page_checksum(payload) if payload.numel() and with_checksum else 0
        algorithm = DEVICE_CHECKSUM_ALGORITHM
    else:
        byte_count, algorithm, value = len(payload), CHECKSUM_ALGORITHM, checksum(payload)
    manifest = _model_manifest(spec, layout.num_pages, byte_count, algorithm, value)
    manifest.page_size = layout.page_size
    manifest.head_lens.extend(layout.head_lens.flatten().tolist())
    return manifest


def early_manifest(spec: ModelSpec, max_pages: int) -> kv_pb2.KVManifest:
    """The manifest of an early reservation (ReserveKVRequest.early): this model's KV of at most
    `max_pages` pages, with no layout and no checksum yet (both come with CommitKV)."""
    return _model_manifest(spec, max_pages, max_pages * spec.bytes_per_page, DEVICE_CHECKSUM_ALGORITHM, 0)


def _model_manifest(
    spec: ModelSpec, num_pages: int, byte_count: int, algorithm: str, value: int
) -> kv_pb2.KVManifest:
    """A manifest of this model's pages, without a layout (head_lens)."""
    return kv_pb2.KVManifest(
        model_fingerprint=spec.fingerprint,
        dtype=spec.dtype,
        codec="none",
        page_size=spec.page_size,
        num_layers=spec.num_layers,
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        num_pages=num_pages,
        byte_count=byte_count,
        checksum_algorithm=algorithm,
        checksum=value,
    )


def check_early_manifest(manifest: kv_pb2.KVManifest, spec: ModelSpec) -> int:
    """The page count an early reservation's manifest asks for, after checking it against this node's
    model (as `check_manifest` does) and that it carries no layout yet."""
    _check_model(manifest, spec)
    require(
        len(manifest.head_lens) == 0,
        "manifest.head_lens",
        "must be empty in an early reservation (the layout comes with CommitKV)",
    )
    require(
        manifest.byte_count == manifest.num_pages * spec.bytes_per_page,
        "manifest.byte_count",
        f"is {manifest.byte_count} but {manifest.num_pages} pages take {manifest.num_pages * spec.bytes_per_page} bytes",
    )
    return manifest.num_pages


def check_manifest(manifest: kv_pb2.KVManifest, spec: ModelSpec) -> KVLayout:
    """The layout a manifest describes, after checking it against this node's model and pool.

    A different model, dtype, page size or codec raises ManifestMismatchError (FAILED_PRECONDITION); an
    inconsistent manifest raises InvalidArgumentError. Nothing is reserved before this passes."""
    _check_model(manifest, spec)
    L, H = spec.num_layers, spec.num_kv_heads
    require(len(manifest.head_lens) == L * H, "manifest.head_lens", f"must hold {L} x {H} counts")
    return _layout_of(manifest, spec)


def _check_model(manifest: kv_pb2.KVManifest, spec: ModelSpec) -> None:
    for name, mine in (
        ("model_fingerprint", spec.fingerprint),
        ("dtype", spec.dtype),
        ("page_size", spec.page_size),
        ("num_layers", spec.num_layers),
        ("num_kv_heads", spec.num_kv_heads),
        ("head_dim", spec.head_dim),
    ):
        theirs = getattr(manifest, name)
        if theirs != mine:
            raise ManifestMismatchError(
                f"manifest.{name}: the KV is {theirs!r} but this decode node has {mine!r}",
                field=f"manifest.{name}",
            )
    if manifest.codec not in CODECS:
        raise ManifestMismatchError(
            f"manifest.codec: {manifest.codec!r} is not supported here; use one of {CODECS}",
            field="manifest.codec",
        )
    require(
        manifest.checksum_algorithm in CHECKSUM_ALGORITHMS,
        "manifest.checksum_algorithm",
        f"must be one of {CHECKSUM_ALGORITHMS}, got {manifest.checksum_algorithm!r}",
    )


def _layout_of(manifest: kv_pb2.KVManifest, spec: ModelSpec) -> KVLayout:
    L, H = spec.num_layers, spec.num_kv_heads
    layout = KVLayout(torch.tensor(list(manifest.head_lens), dtype=torch.int64).view(L, H), spec.page_size)
    require(
        manifest.num_pages == layout.num_pages,
        "manifest.num_pages",
        f"is {manifest.num_pages} but head_lens need {layout.num_pages} pages",
    )
    require(
        manifest.byte_count == layout.num_pages * spec.bytes_per_page,
        "manifest.byte_count",
        f"is {manifest.byte_count} but {layout.num_pages} pages take {layout.num_pages * spec.bytes_per_page} bytes",
    )
    return layout


def context_ref(ref: kv_pb2.ContextRef, spec: ModelSpec) -> ContextRef:
    """The cached context a ReserveKV names, its shape checked against this node's model (the engine
    checks it against the prompt)."""
    L, H = spec.num_layers, spec.num_kv_heads
    require(len(ref.head_lens) == L * H, "context.head_lens", f"must hold {L} x {H} counts")
    lens = torch.tensor(list(ref.head_lens), dtype=torch.int64).view(L, H)
    context = ContextRef(ref.handle, ref.num_tokens, lens, spec.page_size)
    require(
        bool((lens % spec.page_size == 0).all()) and ref.num_pages == context.num_pages,
        "context.num_pages",
        f"is {ref.num_pages} but head_lens take {int((lens // spec.page_size).sum())} whole pages",
    )
    return context


def check_transfer_size(
    manifest: kv_pb2.KVManifest, spec: ModelSpec, pool_pages: int, max_bytes: int, context_pages: int = 0
) -> None:
    """Refuse a transfer that can never be taken, before anything is reserved or allocated: more
    bytes than `max_bytes` (0: no limit of its own) or more pages than the whole pool holds
    (`context_pages`: a cached context's, which travel too when this node does not hold it)."""
    num_pages = manifest.num_pages + context_pages
    byte_count = manifest.byte_count + context_pages * spec.bytes_per_page
    if byte_count > max_bytes > 0:
        raise ResourceExhaustedError(
            f"manifest.byte_count: {byte_count} bytes exceed this node's max_transfer_bytes {max_bytes}",
            field="manifest.byte_count",
            retryable=False,
        )
    if num_pages > pool_pages or byte_count > pool_pages * spec.bytes_per_page:
        raise ResourceExhaustedError(
            f"manifest.num_pages: {num_pages} pages ({byte_count} bytes) can never fit in "
            f"this node's pool of {pool_pages} pages",
            field="manifest.num_pages",
            retryable=False,
        )
