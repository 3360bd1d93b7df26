"""Python clients of the coordinator: `Client` (blocking) and `AsyncClient` (asyncio).

from kvferry.clients import Client
with Client("127.0.0.1:50051") as client:
    result = client.generate("Why is the sea blue?", max_new_tokens=64, temperature=0)
    for chunk in client.stream(messages=[{"role": "user", "content": "Hi"}], compression="compactor", retention=0.5):
        print(chunk.text, end="")
"""

from kvferry.clients.async_client import AsyncClient
from kvferry.clients.client import Client
from kvferry.clients.errors import KvferryRpcError
from kvferry.clients.requests import ContextHandle
from kvferry.clients.results import GenerateResult, StreamChunk

__all__ = ["AsyncClient", "Client", "ContextHandle", "GenerateResult", "KvferryRpcError", "StreamChunk"]
