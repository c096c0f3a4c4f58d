"""Write the DeepSeek V4 reproduction page: ``python bench/plan_reproduce.py > docs/reproduction.md``.

Prints the markdown page (planner arithmetic only, nothing timed), then, on stderr, one JSON line of the key ratios.
"""

from __future__ import annotations

import json
import sys

from reproduction import markdown, numbers  # bench/reproduction.py, next to this script


def main() -> None:
    print(markdown())
    r = numbers()
    keys = ("kv_ratio", "kv_bf16_gib", "flops_ratio")
    print(json.dumps({m: {k: round(r[m][k], 4) for k in keys} for m in r}), file=sys.stderr)


if __name__ == "__main__":
    main()
