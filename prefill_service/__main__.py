"""`python -m prefill_service --help`"""

from __future__ import annotations

import asyncio
import sys

from kvferry.serving.memory_trim import limit_malloc_arenas
from kvferry.serving.parent_death import die_with_parent
from kvferry.serving.settings import parse_settings


def main(argv: list[str] | None = None) -> int:
    die_with_parent()  # when `kvferry up` started us (serving/parent_death.py)
    limit_malloc_arenas()  # before any thread allocates (serving/memory_trim.py)
    from kvferry.prefill_service.settings import PrefillSettings

    settings = parse_settings(PrefillSettings, argv, prog="python -m prefill_service")
    from kvferry.prefill_service.server import serve

    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
