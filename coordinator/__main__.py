"""`python -m coordinator --help`"""

from __future__ import annotations

import asyncio
import sys

from kvferry.serving.memory_trim import limit_malloc_arenas
from kvferry.serving.parent_death import die_with_parent
from kvferry.serving.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # when `kvferry up` started us (serving/parent_death.py)
    limit_malloc_arenas()  # before any thread allocates (serving/memory_trim.py)
    from kvferry.coordinator.settings import CoordinatorSettings

    settings = parse_settings(CoordinatorSettings, argv, prog="python -m coordinator")
    from kvferry.coordinator.server import serve

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
