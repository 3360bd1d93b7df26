"""Serving benchmark: `kvferry bench` (clients/bench.py) under its old name; the same flags.

    python benchmarks/serving.py --target 127.0.0.1:50051 --num-requests 64 --concurrency 16
    python benchmarks/serving.py --model cfg/ --load-format dummy --retention 1,0.5,0.25,0.1 --out run
    python benchmarks/serving.py --compare colocated,disaggregated --model cfg/ --load-format dummy ...

`python benchmarks/serving.py --help` lists every flag.
"""

from __future__ import annotations

import sys

from kvferry.clients.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
