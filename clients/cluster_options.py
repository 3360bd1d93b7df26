"""What a local cluster runs on: model, per-service device and KV memory, dtype, transport.

`kvferry up`, `kvferry demo` and `kvferry bench` share these flags. They become service flags (the
same ones `kvferry prefill|decode --help` lists), so what a service does with them is decided by its
own settings class (prefill_service/settings.py, decode_service/settings.py), never here:

    kvferry up --model benchmarks/configs/llama-3.1-8b --load-format dummy \\
        --prefill-device cuda:0 --decode-device cuda:1 --decode-kv-cache-gib 40 --transport auto
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvferry.serving.settings import EngineSettings

GIB = 1 << 30
# kvtransfer.selection.AUTO + TRANSPORT_NAMES, spelled out so the CLI does not import torch to build its
# parser; tests/test_bench.py checks the two agree.
TRANSPORTS = ("auto", "grpc", "cuda_ipc", "nccl", "shm")


@dataclass
class ClusterOptions:
    """Flags for the two engine services of a local cluster. None: the service's own default."""

    model: str | None = None
    load_format: str | None = None  # auto | dummy (random weights from config.json)
    device: str | None = None  # both engines; prefill_device / decode_device win for their service
    prefill_device: str | None = None
    decode_device: str | None = None
    dtype: str | None = None
    kv_cache_bytes: int | None = None  # both engines; the per-service values win
    prefill_kv_cache_bytes: int | None = None
    decode_kv_cache_bytes: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    prefill_chunk: int | None = None
    page_size: int | None = None
    torch_threads: int | None = None
    transport: str | None = None  # the prefill service's `transport` (how its pages reach decode)
    engine_args: list[str] = field(default_factory=list)  # raw engine flags for both, before the above
    prefill_args: list[str] = field(default_factory=list)  # raw prefill-only flags, last
    decode_args: list[str] = field(default_factory=list)  # raw decode-only flags, last

    def _common(self) -> list[str]:
        out = list(self.engine_args)
        for name in ("model", "load_format", "dtype", "max_model_len", "max_num_seqs", "prefill_chunk",
                     "page_size", "torch_threads"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                out += ["--" + name.replace("_", "-"), str(value)]
        return out

    def _own(self, device: str | None, kv_bytes: int | None) -> list[str]:
        out: list[str] = []
        if (device or self.device) is not None:
            out += ["--device", str(device or self.device)]
        if (kv_bytes or self.kv_cache_bytes) is not None:
            out += ["--kv-cache-bytes", str(kv_bytes or self.kv_cache_bytes)]
        return out

    def prefill_argv(self) -> list[str]:
        """Every flag the prefill service gets (later flags win in argparse)."""
        transport = ["--transport", self.transport] if self.transport else []
        own = self._own(self.prefill_device, self.prefill_kv_cache_bytes)
        return [*self._common(), *own, *transport, *self.prefill_args]

    def decode_argv(self) -> list[str]:
        """Every flag the decode service gets."""
        return [
            *self._common(),
            *self._own(self.decode_device, self.decode_kv_cache_bytes),
            *self.decode_args,
        ]

    def colocated_settings(self) -> EngineSettings:
        """The engine a colocated run uses: the decode node's (device, KV budget), which also prefills."""
        from kvferry.serving.settings import EngineSettings, parse_settings

        argv = [*self._common(), *self._own(self.decode_device, self.decode_kv_cache_bytes)]
        return parse_settings(EngineSettings, argv, environ={})


def _gib(text: str) -> int:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return int(value * GIB)


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (services started here)")
    g.add_argument("--model", help="HF model folder, config folder (--load-format dummy) or .gguf "
                   "(default: bundled SmolLM2-135M-Instruct)")  # fmt: skip
    g.add_argument("--load-format", choices=("auto", "dummy"), help="dummy: random weights from config.json")
    g.add_argument("--device", help="torch device of both engines: cpu, cuda, cuda:1 (default: auto)")
    g.add_argument("--prefill-device", help="the prefill engine's device (e.g. cuda:0); beats --device")
    g.add_argument("--decode-device", help="the decode engine's device (e.g. cuda:1); beats --device")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="weights and KV")
    g.add_argument(
        "--kv-cache-bytes",
        type=int,
        help="KV pool bytes of each engine (CUDA default: 90%% of free memory, so give both a budget "
        "when they share a GPU)",
    )
    g.add_argument("--kv-cache-gib", type=_gib, dest="kv_cache_bytes", metavar="GIB", help="the same in GiB")
    g.add_argument(
        "--prefill-kv-cache-gib",
        type=_gib,
        dest="prefill_kv_cache_bytes",
        metavar="GIB",
        help="prefill KV pool",
    )
    g.add_argument(
        "--decode-kv-cache-gib", type=_gib, dest="decode_kv_cache_bytes", metavar="GIB", help="decode KV pool"
    )
    g.add_argument("--max-model-len", type=int, help="prompt + output positions")
    g.add_argument("--max-num-seqs", type=int, help="sequences an engine runs together at most")
    g.add_argument("--prefill-chunk", type=int, help="prompt tokens per prefill step")
    g.add_argument("--torch-threads", type=int, help="CPU threads per engine process")
    g.add_argument("--transport", choices=TRANSPORTS,
                   help="how the prefill service ships KV pages (default: the service's, auto)")  # fmt: skip
    g.add_argument("--engine-args", default="", help="more engine flags for both services, one string")
    g.add_argument(
        "--prefill-args", default="", help="more prefill service flags, e.g. '--reserve-wait-seconds 600'"
    )
    g.add_argument("--decode-args", default="", help="more decode service flags, e.g. '--lease-seconds 60'")


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """ClusterOptions from the flags of add_cluster_flags (missing attributes: None)."""
    raw = ("engine_args", "prefill_args", "decode_args")
    values: dict[str, Any] = {
        n: getattr(args, n, None) for n in ClusterOptions.__dataclass_fields__ if n not in raw
    }
    values.update({n: shlex.split(getattr(args, n, "") or "") for n in raw})
    return ClusterOptions(**values)
