"""Splice the regenerated table.md and the new tail into the routers page (scratch helper, not committed)."""
import re, sys
from pathlib import Path
page = Path("experiments/results/routers/README.md")
s = page.read_text()
table = Path("experiments/results/routers/table.md").read_text()
table = re.sub(r"^### ", "#### ", table, flags=re.M)
head = s[:s.index("#### K6: 600 steps")]
fig = '''![learning curves](curves.png)

[curves.png](curves.png): the mean over the run seeds of the methods in `FIGURE` (one or two per
family; all of them would be too many lines to tell apart). Left: exact match on the seen
phrasings along the schedule. Right: the best block's within − between Jaccard.

'''
tail = Path("runs/tail_new.md").read_text()
import json, numpy as np
toy = json.loads(Path("experiments/results/routers/results.json").read_text())["curves"]["toy suite"]
sd = lambda v: f"{np.mean(v):.1f} ± {np.std(v, ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"
rows = []
for label, runs in toy.items():
    seen = [x["seen"][-1] for x in runs]; held = [x["heldout"][-1] for x in runs]
    rows.append(f"  | {label} | {' / '.join(f'{v:.1f}' for v in seen)} | {' / '.join(f'{v:.1f}' for v in held)} | {sd(seen)} | {sd(held)} |")
tail = tail.replace("  ⟨TOYTABLE⟩", "\n".join(rows))
fills = dict(a.split("=", 1) for a in sys.argv[1:])
for k, v in fills.items():
    tail = tail.replace(f"⟨{k}⟩", v)
left = re.findall(r"⟨[A-Z0-9]+⟩", tail)
page.write_text(head + table.rstrip() + "\n\n" + fig + tail)
print("unfilled:", left)
