#!/usr/bin/env python3
"""The import graph of meshfed's library modules, and every import circle in it.

    python3 scripts/module-graph.py [--level top|folder] [--src DIR] [FOLDER...]

Reads src/**/*.rs (not the crate roots lib.rs and main.rs, nor src/bin/) and finds every path one
module uses: `use` declarations, grouped ones included (`use crate::{a, b::{c, d}}`), and paths in
code (`crate::x::f()`, `super::y::Z`, `self::z::W`, and in a module with submodules `child::Item`).
Comments, string literals and `#[cfg(test)]` items (a `mod tests { ... }` block, or a test module
in its own file such as `tests.rs` declared `#[cfg(test)] mod tests;`) are ignored: tests may use
anything. A path names the module it lands in: the longest prefix that is a module (so
`crate::source::kube::WatchedKind` names `source::kube`, a re-export included).

--level top (default): one node per top-level module (src/X.rs or src/X/), an edge where a module
uses another. --level folder: for each folder (src/X/, src/X/Y/, ...; or only the FOLDERs given,
e.g. `source/kube`), one node for the folder's own module (mod.rs, shown as `(mod)`) and one per
file or subfolder in it, an edge where one uses another (a use of an item re-exported by mod.rs is
an edge to `(mod)`); uses outside the folder are not shown.

Prints the graph (each node and what it uses), then every circle: each strongly connected component
of more than one node, with where each of its edges is first used. Exits 1 if there is a circle, 0
if there is none, 2 on a usage error. Python 3 standard library only.
"""

import argparse
import os
import re
import sys
from collections import defaultdict

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def blank(text, start, end):
    """text with [start, end) replaced by spaces, newlines kept (positions and line numbers stay)."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def strip_comments_and_literals(text):
    """Comments, string literals (raw ones too) and character literals replaced by spaces."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif re.match(r"b?r#*\"", text[i:i + 80]) and (i == 0 or not re.match(r"\w", text[i - 1])):
            m = re.match(r"b?r(#*)\"", text[i:])
            close = '"' + m.group(1)
            j = text.find(close, i + m.end())
            j = n if j < 0 else j + len(close)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"' or (c == "b" and text.startswith('b"', i) and (i == 0 or not re.match(r"\w", text[i - 1]))):
            j = i + (2 if c == "b" else 1)
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(n, j + 1)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'":
            # a character literal ('a', '\n', '\u{1F600}'), else a lifetime or label ('a, 'static)
            m = re.match(r"'(\\(u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'", text[i:])
            if m:
                out.append(" " * m.end())
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching(text, open_pos):
    """The position just after the bracket closing the one at open_pos."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    stack = []
    for j in range(open_pos, len(text)):
        ch = text[j]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
    return len(text)


def item_end(text, pos):
    """The end of the item starting at pos: its `;`, or the end of its body `{ ... }`."""
    is_use = re.match(r"\s*(pub(\([^)]*\))?\s+)?use\b", text[pos:]) is not None
    j = pos
    while j < len(text):
        ch = text[j]
        if ch in "([" or (ch == "{" and is_use):
            j = matching(text, j)
            continue
        if ch == "{":
            return matching(text, j)
        if ch == ";":
            return j + 1
        j += 1
    return len(text)


def remove_test_items(text):
    """text without its #[cfg(test)] items, and the names of test modules declared as files."""
    test_files = set()
    attr = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")
    pos = 0
    while True:
        m = attr.search(text, pos)
        if not m:
            return text, test_files
        j = m.end()
        # further attributes of the same item
        while True:
            a = re.match(r"\s*#\s*\[", text[j:])
            if not a:
                break
            j = matching(text, j + a.end() - 1)
        decl = re.match(r"\s*(pub(\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;", text[j:])
        if decl:
            test_files.add(decl.group(3))
        end = item_end(text, j)
        text = blank(text, m.start(), end)
        pos = m.start()


def parse_use_tree(s):
    """The paths of a use tree (`crate::{a, b::c as d, e::*}` -> [crate,a], [crate,b,c], [crate,e,*])."""
    tokens = re.findall(IDENT + r"|::|[{},*]", s)
    pos = 0

    def tree(prefix):
        nonlocal pos
        path = list(prefix)
        while pos < len(tokens):
            t = tokens[pos]
            if t == "::":
                pos += 1
            elif t == "{":
                pos += 1
                out = []
                while pos < len(tokens) and tokens[pos] != "}":
                    if tokens[pos] == ",":
                        pos += 1
                        continue
                    out.extend(tree(path))
                pos += 1
                return out
            elif t in ",}":
                return [path]
            elif t == "as":
                pos += 2
                return [path]
            else:
                path.append(t)
                pos += 1
        return [path]

    return tree([])


class Crate:
    def __init__(self, src):
        self.src = src
        self.modules = {}  # module path (tuple) -> file (relative to src)
        self.dirs = set()  # module paths that are folders
        self.children = defaultdict(set)  # module path -> names of its submodules
        self.test_modules = set()  # module paths of test modules in files
        self.uses = []  # (from module path, to module path, "file:line")
        files = []
        for root, dirs, names in os.walk(src):
            dirs.sort()
            for name in sorted(names):
                if name.endswith(".rs"):
                    files.append(os.path.relpath(os.path.join(root, name), src))
        for f in files:
            parts = f[:-3].split(os.sep)
            if parts in (["lib"], ["main"]) or parts[0] == "bin":
                continue
            if parts[-1] == "mod":
                parts = parts[:-1]
                self.dirs.add(tuple(parts))
            self.modules[tuple(parts)] = f
        for m in list(self.modules):
            if len(m) > 1:
                self.children[m[:-1]].add(m[-1])
        self.texts = {}
        for m, f in self.modules.items():
            with open(os.path.join(src, f), encoding="utf-8") as fh:
                text, test_files = remove_test_items(strip_comments_and_literals(fh.read()))
            self.texts[m] = text
            for t in test_files:
                self.test_modules.add(m + (t,))
        for m in sorted(self.modules):
            if not any(m[: i + 1] in self.test_modules for i in range(len(m))):
                self.scan(m)

    def scan(self, module):
        text = self.texts[module]
        f = self.modules[module]
        # inline modules (`mod name { ... }`): their paths are relative to them
        inline = []
        for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", text):
            start = m.end() - 1
            inline.append((start, matching(text, start), m.group(1)))
            self.modules.setdefault(module + (m.group(1),), f)
            self.children[module].add(m.group(1))

        def module_at(pos):
            path = module
            for start, end, name in inline:
                if start <= pos < end:
                    path = path + (name,)
            return path

        def line(pos):
            return text.count("\n", 0, pos) + 1

        covered = []
        for m in re.finditer(r"(?<![\w$])use\s+([^;]*);", text):
            covered.append((m.start(), m.end()))
            here = module_at(m.start())
            for path in parse_use_tree(m.group(1)):
                self.add(here, path, f"{f}:{line(m.start())}")
        for m in re.finditer(r"(?<![\w$:])(" + IDENT + r")((?:\s*::\s*" + IDENT + r")+)", text):
            if any(s <= m.start() < e for s, e in covered):
                continue
            here = module_at(m.start())
            first = m.group(1)
            if first in ("crate", "self", "super") or first in self.children.get(here, ()):
                path = [first] + re.findall(IDENT, m.group(2))
                self.add(here, path, f"{f}:{line(m.start())}")

    def add(self, here, path, where):
        if not path:
            return
        if path[0] == "crate":
            absolute = list(path[1:])
        elif path[0] in ("self", "super"):
            absolute = list(here)
            rest = list(path)
            while rest and rest[0] in ("self", "super"):
                if rest.pop(0) == "super":
                    if not absolute:
                        return
                    absolute.pop()
            absolute += rest
        elif path[0] in self.children.get(here, ()):
            absolute = list(here) + list(path)
        else:
            return  # another crate, or a name imported by a glob
        target = ()
        for i in range(1, len(absolute) + 1):
            if tuple(absolute[:i]) in self.modules:
                target = tuple(absolute[:i])
            else:
                break
        if target and any(target[: i + 1] in self.test_modules for i in range(len(target))):
            return
        self.uses.append((here, target, where))


def graph_of(crate, node_of):
    """{node: {node: first place}} from the crate's uses, with node_of(module path) -> node or None."""
    graph = defaultdict(dict)
    for here, target, where in crate.uses:
        a, b = node_of(here), node_of(target)
        if a is None or b is None:
            continue
        graph[a]
        graph[b]
        if a != b:
            graph[a].setdefault(b, where)
    return graph


def cycles(graph):
    """Strongly connected components of more than one node (Tarjan), each sorted, sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def report(title, graph):
    """Prints a graph and its circles; returns the number of circles."""
    print(title)
    width = max((len(v) for v in graph), default=0)
    for v in sorted(graph):
        print(f"  {v:<{width}} -> {', '.join(sorted(graph[v])) or '(nothing)'}")
    found = cycles(graph)
    for comp in found:
        print(f"  CIRCLE: {' <-> '.join(comp)}")
        for a in comp:
            for b in sorted(graph[a]):
                if b in comp:
                    print(f"    {a} -> {b}  ({graph[a][b]})")
    if not found:
        print("  no circle")
    return len(found)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", choices=["top", "folder"], default="top")
    parser.add_argument("--src", default=os.path.join(here, "..", "src"), help="the crate's src/ (default: ../src)")
    parser.add_argument("folders", nargs="*", help="with --level folder: only these folders (e.g. source/kube)")
    args = parser.parse_args()
    if args.folders and args.level != "folder":
        parser.error("FOLDERs go with --level folder")
    crate = Crate(os.path.normpath(args.src))
    if args.level == "top":
        graph = graph_of(crate, lambda m: m[0] if m else None)
        return 1 if report("top-level modules (src/X.rs, src/X/), #[cfg(test)] code ignored:", graph) else 0
    folders = sorted(crate.dirs)
    if args.folders:
        wanted = [tuple(f.strip("/").split("/")) for f in args.folders]
        unknown = [f for f, w in zip(args.folders, wanted) if w not in crate.dirs]
        if unknown:
            parser.error(f"not a folder of {args.src}: {', '.join(unknown)}")
        folders = wanted
    found = 0
    for folder in folders:
        n = len(folder)

        def node_of(m, folder=folder, n=n):
            if m[:n] != folder:
                return None
            return "(mod)" if len(m) == n else m[n]

        graph = graph_of(crate, node_of)
        for child in crate.children.get(folder, ()):
            if folder + (child,) not in crate.test_modules and crate.modules.get(folder + (child,)) != crate.modules[folder]:
                graph[child]
        graph["(mod)"]
        found += report(f"{'/'.join(folder)}/ (files and subfolders), #[cfg(test)] code ignored:", graph)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
