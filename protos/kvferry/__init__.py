"""kvferry: disaggregated prefill/decode LLM serving with compressed, head-sparse KV caches.

Everything installed lives under this one package: `kvferry.engine` (the offline `LLM` and the
engine), `kvferry.clients` (`Client`, `AsyncClient`, the CLI), `kvferry.v1` (the generated gRPC
API), `kvferry.coordinator`, `kvferry.prefill_service`, `kvferry.decode_service`,
`kvferry.kvtransfer`, `kvferry.kernels` and `kvferry.serving`.

In the repository each subpackage is a top-level folder (engine/, clients/, ...) and this file sits
with the generated API under protos/kvferry/; pyproject.toml's package-dir mapping puts them together
at install time (`pip install -e .` for a checkout). The repository root itself is never an import
root: its folders' plain names (`kernels`, `engine`, ...) would shadow other packages.
Importing this package imports nothing else.
"""

__version__ = "0.1.0"
