"""One typed settings object per process, from CLI flags with KVFERRY_* environment fallbacks.

A settings class is a dataclass whose fields are declared with `setting(default, help)`. Each field
`foo_bar` becomes the flag `--foo-bar` with the environment fallback `KVFERRY_FOO_BAR`; a flag beats the
environment, which beats the default. Parsed once, in the service's __main__.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from kvferry.engine.config import EngineConfig
    from kvferry.serving.compression_policy import CompressionPolicy

ENV_PREFIX = "KVFERRY_"
S = TypeVar("S")


def setting(default: Any, help: str, env: str | None = None) -> Any:
    """A settings field; `env` overrides the environment variable name."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, "env": env})
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


def env_name(field: dataclasses.Field) -> str:
    return field.metadata.get("env") or ENV_PREFIX + field.name.upper()


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(element type, optional) of `int`, `int | None`, `list[str]`..."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    return annotation, optional


def _parser_for(kind: Any, optional: bool) -> Any:
    def parse(text: str) -> Any:
        if optional and text.strip().lower() in ("", "none"):
            return None
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            return [item(part.strip()) for part in text.split(",") if part.strip()]
        if kind is bool:
            value = text.strip().lower()
            if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"not a boolean: {text!r}")
            return value in ("1", "true", "yes", "on")
        return kind(text)

    parse.__name__ = getattr(kind, "__name__", str(kind))  # argparse names the type in errors
    return parse


def parse_settings(
    cls: type[S],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> S:
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").strip(),
        epilog=f"Every flag falls back to an environment variable ({ENV_PREFIX}<FLAG_NAME>) and then to its default.",
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind, optional = _base_type(hints[f.name])
        parse = _parser_for(kind, optional)
        var = env_name(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if var in environ:
            try:
                default = parse(environ[var])
            except ValueError as e:
                parser.error(f"environment variable {var}={environ[var]!r}: {e}")
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} [env {var}; default: {default!r}]"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            metavar = "LIST" if typing.get_origin(kind) is list else kind.__name__.upper()
            parser.add_argument(flag, type=parse, default=default, metavar=metavar, help=help_text)
    args = parser.parse_args(argv)
    try:
        return cls(**vars(args))
    except ValueError as e:  # a settings class's own checks (engine.InvalidArgumentError included)
        parser.error(str(e))


@dataclasses.dataclass
class ServerSettings:
    """Where and how a gRPC service listens."""

    host: str = setting("127.0.0.1", "address to bind (0.0.0.0 to serve other hosts)")
    port: int = setting(50051, "port to bind (0 picks a free one and logs it)")
    grace_seconds: float = setting(5.0, "on SIGTERM, seconds in-flight calls get to finish")
    log_level: str = setting("INFO", "logging level")
    tls_cert: str | None = setting(
        None,
        "PEM certificate chain this service presents: TLS on its port, and its client certificate "
        "toward the services it calls",
    )
    tls_key: str | None = setting(None, "PEM private key of tls_cert")
    tls_client_ca: str | None = setting(
        None, "PEM CA bundle: require client certificates signed by it on this port (mutual TLS)"
    )
    tls_ca: str | None = setting(
        None, "PEM CA bundle to verify the services this one calls (TLS on its outgoing channels)"
    )
    tls_server_name: str | None = setting(
        None, "name expected in called services' certificates (default: the host of their address)"
    )
    metrics_port: int | None = setting(
        None, "serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port; default: off)"
    )
    auth_token: str | None = setting(
        None,
        "bearer token of the cluster: every call to this service must send it (metadata "
        "'authorization: Bearer <token>'; health excepted), and this service sends it to the services it "
        "calls; default: none needed",
    )
    auth_token_file: str | None = setting(None, "file holding the bearer token (instead of auth_token)")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclasses.dataclass
class CompressionPolicySettings:
    """The operator's compression policy (serving/compression_policy.py): what requests that do not say
    how to compress get."""

    default_compression: str = setting(
        "",
        "compression method for requests that name none (compactor, snapkv, ...); none: they keep their whole "
        "cache unless they ask for compression; empty: none, or compactor if --default-retention is given",
    )
    default_retention: str | None = setting(
        None,
        'retention for requests that give no budget: a fraction of the KV kept in (0, 1], or "auto" (chosen '
        "per request from the context)",
    )
    default_quality_target: float | None = setting(
        None, 'the quality target of "auto" for requests that give none, in (0, 1] (unset: 0.95)'
    )

    def compression_policy(self) -> CompressionPolicy:
        from kvferry.serving.compression_policy import CompressionPolicy

        return CompressionPolicy.from_settings(
            self.default_compression, self.default_retention, self.default_quality_target
        )


@dataclasses.dataclass
class EngineSettings:
    """The engine a prefill or decode service runs."""

    model: str | None = setting(
        None, "HF model folder or .gguf file (default: bundled SmolLM2-135M-Instruct)"
    )
    load_format: str = setting("auto", "auto reads the weights; dummy builds random ones from config.json")
    device: str = setting("auto", "torch device: auto, cpu, cuda, cuda:1 ...")
    dtype: str = setting("auto", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    page_size: int = setting(16, "tokens per KV page of one (layer, kv-head)")
    prefill_chunk: int | None = setting(
        None, "prompt tokens processed per prefill step (default: 2048 on CUDA, 512 on CPU)"
    )
    max_model_len: int | None = setting(None, "prompt + output positions (default: the model's own limit)")
    kv_cache_bytes: int | None = setting(
        None, "KV pool size in bytes (default: 2 GiB on CPU, 90%% of free on CUDA)"
    )
    max_num_seqs: int = setting(
        64, "sequences the engine runs at once (admitted from its queue; on decode, the largest batch)"
    )
    max_prefill_bypass: int = setting(
        16,
        "prefill order: the prompt with the fewest tokens left runs its chunk first, the oldest once passed "
        "over this many times in a row; 0: first come, first served",
    )
    torch_threads: int | None = setting(None, "torch intra-op CPU threads (default: torch's choice)")
    enforce_eager: bool = setting(False, "never replay decode steps from CUDA graphs (debugging; GPU only)")
    prefill_attention: str = setting(
        "auto",
        "CUDA prefill attention: auto (cuDNN on the gathered prefix where it applies, else the Triton "
        "kernel) or triton (always the Triton kernel)",
    )
    layer_kernels: bool = setting(
        True, "CUDA: RMSNorm, RoPE and the SwiGLU gate as one-pass Triton kernels (off: eager PyTorch ops)"
    )
    fused_projections: bool = setting(
        True, "q/k/v in one matmul, and the SwiGLU gate and up projections in one (off: one matmul each)"
    )
    context_cache_gib: float | None = setting(
        None,
        "GiB of the KV pool the cache of compressed contexts may hold (default: a quarter of the pool; 0: "
        "contexts are never kept). Prefill: compressed once, reused by every request on the context; "
        "decode: shared by the requests on it, shipped once",
    )
    context_cache_host_gib: float | None = setting(
        None,
        "GiB of host memory (pinned on CUDA) for contexts pushed out of the pool, restored on their next "
        "hit (default: as much as context_cache_gib; 0: none)",
    )

    def engine_config(self) -> EngineConfig:
        from kvferry.engine.config import (
            EngineConfig,  # torch loads here, not when a coordinator imports this
        )

        return EngineConfig(
            model=self.model,
            load_format=self.load_format,
            device=self.device,
            dtype=self.dtype,
            page_size=self.page_size,
            prefill_chunk=self.prefill_chunk,
            max_model_len=self.max_model_len,
            kv_cache_bytes=self.kv_cache_bytes,
            max_num_seqs=self.max_num_seqs,
            max_prefill_bypass=self.max_prefill_bypass,
            enforce_eager=self.enforce_eager,
            prefill_attention=self.prefill_attention,
            layer_kernels=self.layer_kernels,
            fused_projections=self.fused_projections,
            context_cache_bytes=_gib_bytes("context_cache_gib", self.context_cache_gib),
            context_cache_host_bytes=_gib_bytes("context_cache_host_gib", self.context_cache_host_gib),
        )


def _gib_bytes(name: str, gib: float | None) -> int | None:
    if gib is None:
        return None
    if not gib >= 0:  # NaN included
        raise ValueError(f"{name}: must be >= 0 GiB, got {gib}")
    return int(gib * (1 << 30))
