"""Peak memory of fitting Mahalanobis and kNN (bank 50,000) in chunks vs the row count.

Each (score, rows) runs in a fresh process that generates 4096-row chunks of 256-d features
(10 classes) on the fly, as a feature cache's shards are read, fits with ``fit_chunks`` and
reports its peak RSS (``ru_maxrss``). Writes docs/results/posthoc_memory.md.

    nice -n 5 .venv/bin/python bench/posthoc_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys, torch
from oodlab.detect.scores import build_score
name, rows = sys.argv[1], int(sys.argv[2])
class Chunks:
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for lo in range(0, rows, 4096):
            n = min(4096, rows - lo)
            yield torch.randn(n, 256, generator=g), torch.zeros(n, 10), torch.arange(n) % 10
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
score = build_score(name, **({"bank_size": 50000} if name == "knn" else {}))
score.fit_chunks(Chunks())
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    rows_list = [20_000, 200_000, 2_000_000]
    lines = ["| score | rows | peak RSS (MiB) | RSS growth during fit (MiB) | full matrix (MiB) |",
             "|---|---|---|---|---|"]
    out = {}
    for name in ("mahalanobis", "knn"):
        for rows in rows_list:
            res = subprocess.run([sys.executable, "-c", CHILD, name, str(rows)], check=True,
                                 capture_output=True, text=True)
            base, peak = (int(v) / 1024 for v in res.stdout.split())
            out[f"{name}/{rows}"] = peak
            lines.append(f"| {name} | {rows:,} | {peak:.0f} | {peak - base:.0f} | "
                         f"{rows * 256 * 4 / 2**20:.0f} |")
    text = ("# Peak memory of chunked fitting\n\nCommand: `nice -n 5 .venv/bin/python "
            "bench/posthoc_memory.py` (2 shared CPU cores). 256-d features, 4096-row chunks; "
            "'full matrix' is what holding every row in float32 would take.\n\n"
            + "\n".join(lines) + "\n")
    Path("docs/results/posthoc_memory.md").write_text(text)
    print(text, json.dumps(out))


if __name__ == "__main__":
    main()
