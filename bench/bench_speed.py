"""CPU speed of pruned transformers (ecospa's narrow execution): the code is in ``bench/speed/``.

    python bench/bench_speed.py                  # full run, writes bench/results/speed.{json,md,png}
    python bench/bench_speed.py --quick --out /tmp/speed   # smoke test (small shapes, < 3 min)

Same as ``python -m bench.speed.run``; see ``bench/speed/run.py`` for the sections and options.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for ``bench.speed``
    from bench.speed.run import main

    sys.exit(main())
