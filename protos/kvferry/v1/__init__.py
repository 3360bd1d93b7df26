"""Generated code of the kvferry.v1 protos (`python -m protos.generate` rewrites it)."""
