"""Python clients of the coordinator: `Client` (blocking) and `AsyncClient` (asyncio).

from clients import Client
with Client("127.0.0.1:50051") as client:
    result = client.generate("Why is the sea blue?", max_new_tokens=64, temperature=0)
    for chunk in client.stream(messages=[{"role": "user", "content": "Hi"}], compression="compactor", retention=0.5):
        print(chunk.text, end="")
"""

from clients.async_client import AsyncClient
from clients.client import Client
from clients.errors import KvferryRpcError
from clients.results import GenerateResult, StreamChunk

__all__ = ["AsyncClient", "Client", "GenerateResult", "KvferryRpcError", "StreamChunk"]
