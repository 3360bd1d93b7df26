"""Generated code of the kvferry.v1 protos (`python protos/generate.py` rewrites it)."""
