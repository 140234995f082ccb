"""Write a benchmark's headline numbers to ``benchmarks/results/<name>.json`` for the book.

Every ``bench_*.py`` prints its full table; with ``--record`` it also saves the few numbers the
book's appendix shows, with the machine and versions that produced them. ``make bench`` records;
a plain or ``--quick`` run only prints, so trying a benchmark never overwrites the book's numbers.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_record_flag(parser) -> None:
    """The ``--record`` option every benchmark shares (``make bench`` passes it)."""
    parser.add_argument("--record", action="store_true",
                        help="save the headline numbers for the book (benchmarks/results/)")


def machine() -> dict[str, str]:
    """Where the numbers come from: CPU count, platform, Python, torch and (if used) the GPU."""
    import torch

    description = {
        "platform": platform.platform(terse=True),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        description["gpu"] = torch.cuda.get_device_name(0)
    return description


def record(name: str, title: str, rows: list[dict[str, str]], *, settings: str,
           extra: dict | None = None) -> Path:
    """Save ``rows`` (each: measure, value and optionally target) as the result of ``name``.

    Parameters
    ----------
    name : the script's stem without ``bench_`` (``capture``, ``hsdl`` …)
    title : one line saying what was compared
    rows : headline numbers, already formatted as text
    settings : sizes and repeats, one line
    extra : further JSON fields (e.g. the measured series behind a plot)
    """
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "name": name,
        "title": title,
        "command": "python " + " ".join([f"benchmarks/bench_{name}.py", *sys.argv[1:]]),
        "settings": settings,
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "rows": rows,
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"recorded in {path.relative_to(RESULTS.parent.parent)}")
    return path
