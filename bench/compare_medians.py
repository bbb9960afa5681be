#!/usr/bin/env python3
"""Medians of bench/compare.sh output: per side (A, B), the median over rounds of each bench
train row's ms/step and of bench serve's achieved requests/s and p99; then B's ratio to A."""
import re
import statistics
import sys

train, serve = {}, {}
side = what = None
for line in open(sys.argv[1]):
    m = re.match(r"== (\w) (train|serve max|serve 2000)", line)
    if m:
        side, what = m.group(1), m.group(2)
        continue
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if what == "train" and len(cells) == 6 and cells[0] not in ("workload", "---"):
        try:
            train.setdefault((cells[0], cells[1]), {}).setdefault(side, []).append(float(cells[4]))
        except ValueError:
            pass
    elif what and what.startswith("serve") and len(cells) == 10:
        serve.setdefault((what, "rps"), {}).setdefault(side, []).append(float(cells[2]))
        serve.setdefault((what, "p99 ms"), {}).setdefault(side, []).append(float(cells[8]))

print("| measure | A median | B median | B / A | runs |")
print("|---|---|---|---|---|")
for (name, rows), v in train.items():
    a, b = statistics.median(v["A"]), statistics.median(v["B"])
    print(f"| train ms/step: {name} ({rows} rows) | {a:.2f} | {b:.2f} | {b / a:.3f} | {len(v['A'])}+{len(v['B'])} |")
for (name, m), v in serve.items():
    a, b = statistics.median(v["A"]), statistics.median(v["B"])
    print(f"| {name}: {m} | {a:.2f} | {b:.2f} | {b / a:.3f} | {len(v['A'])}+{len(v['B'])} |")
