"""What the handoff of one prefilled request needs besides its pages."""

from __future__ import annotations

from dataclasses import dataclass

from kvferry.kvtransfer.manifest import ModelSpec
from kvferry.kvtransfer.transport import Transport
from kvferry.serving.deadline import Deadline
from kvferry.v1 import common_pb2, decode_pb2, kv_pb2


@dataclass(frozen=True)
class HandoffRequest:
    """Where one request's KV goes, what the decode node needs to run the request, and by when. Built
    once per Prefill call; the early reservation and the handoff both read it."""

    request_id: str
    decode_address: str
    prompt: list[int]
    sampling: common_pb2.SamplingParams  # as the caller sent it: the decode node samples with it
    spec: ModelSpec  # this node's model and pool, which the manifest describes
    transport: (
        str  # the transport the request names (checked), or the node's default; auto is per decode node
    )
    deadline: Deadline

    def reserve_kv(
        self,
        manifest: kv_pb2.KVManifest,
        transport: Transport,
        first_token: int | None,
        context: kv_pb2.ContextRef | None = None,
    ) -> decode_pb2.ReserveKVRequest:
        """The ReserveKV for `manifest` over `transport`. `first_token` None: an early reservation (made
        while the prefill runs; the first token and the final manifest come with CommitKV). `context`:
        the cached context the KV starts with (the manifest then covers the pages after it)."""
        return decode_pb2.ReserveKVRequest(
            context=context,
            request_id=self.request_id,
            manifest=manifest,
            sampling=self.sampling,
            prompt_token_ids=self.prompt,
            first_token_id=first_token,
            transport=transport.name,
            early=first_token is None,
            **transport.reserve_fields(),
        )
