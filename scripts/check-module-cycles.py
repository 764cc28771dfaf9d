#!/usr/bin/env python3
"""Fails when the crate's top-level modules import each other in a loop.

Reads every file under src/ (test modules, `#[cfg(test)] mod tests` to the
end of a file, left out), collects the `crate::<module>` paths each
top-level module uses, and looks for a cycle in that graph. Issue 14: the
module cycles were cut; this keeps them cut. Run from the repository root.
"""
import os
import re
import sys
from collections import defaultdict

SRC = "src"
mods = set()
for n in os.listdir(SRC):
    if n.endswith(".rs"):
        mods.add(n[:-3])
    elif os.path.isdir(os.path.join(SRC, n)):
        mods.add(n)
mods -= {"lib", "main"}

graph = defaultdict(set)
for m in sorted(mods):
    root = os.path.join(SRC, m)
    files = []
    if os.path.isdir(root):
        for r, _, fs in os.walk(root):
            files += [os.path.join(r, f) for f in fs if f.endswith(".rs")]
    else:
        files = [root + ".rs"]
    for p in files:
        with open(p, encoding="utf-8") as f:
            text = f.read()
        cut = text.find("#[cfg(test)]\nmod tests")
        if cut >= 0:
            text = text[:cut]
        used = re.findall(r"crate::([a-z_]+)", text)
        for group in re.findall(r"use crate::\{([^}]*)\}", text):
            used += re.findall(r"\b([a-z_]+)\b", group)
        graph[m] |= {u for u in used if u in mods and u != m}

found = []


def walk(start, node, path):
    for nxt in sorted(graph[node]):
        if nxt == start:
            found.append(path + [start])
        elif nxt > start and nxt not in path:
            walk(start, nxt, path + [nxt])


for s in sorted(mods):
    walk(s, s, [s])

if found:
    for c in found[:20]:
        print("module cycle: " + " -> ".join(c))
    sys.exit(1)
print(f"module cycles: none among {len(mods)} top-level modules")
