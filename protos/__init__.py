"""kvferry's gRPC API: versioned .proto files and the Python code generated from them."""
