#!/usr/bin/env python3
"""Tests of scripts/module-graph.py on a small made-up crate: `python3 scripts/module-graph-test.py`.

The crate has every form the script must read (grouped and nested `use`, `super::super::`, an inline
module, a bare submodule path in mod.rs) and every form it must not count (comments, string and raw
string literals, character literals with quotes, `$crate` in a macro, `#[cfg(test)]` items and a test
module in its own file), and one circle.
"""

import os
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "module-graph.py")

CRATE = {
    "lib.rs": "pub mod a;\n",
    "a.rs": r'''//! docs mention crate::f::X, which is not a use
use crate::{
    b::{self, Thing},
    c,
};
const S: &str = "crate::f::nope \" crate::f::still_a_string";
const R: &str = r#"crate::f::"raw""#;
const Q: char = '"';
const E: char = '\'';
fn g<'a>(x: &'a str) -> &'a str { let _ = crate::c::go; x }
/* block crate::f::no /* nested crate::f::no */ crate::f::no */
#[cfg(test)]
mod tests {
    use crate::f::Test;
}
#[cfg(test)]
use crate::f::Also;
#[cfg(test)]
#[allow(dead_code)]
fn helper() -> [u8; 2] { crate::f::thing(); [0; 2] }
''',
    "b/mod.rs": "mod inner;\npub mod child;\npub use child::Thing;\n#[cfg(test)]\nmod tests;\n",
    "b/child.rs": "pub struct Thing;\npub fn f() { super::super::c::go(); }\n",
    "b/inner.rs": "use super::child::Thing;\npub fn h() -> Thing { Thing }\n",
    "b/tests.rs": "use crate::a::X;\n",
    "c.rs": "pub fn go() {}\nmod nested {\n    fn x() { super::super::f::y(); }\n}\n",
    "f.rs": "macro_rules! m { () => { $crate::a::x() } }\npub fn y() {}\n",
    "d.rs": "use crate::e::X;\n",
    "e.rs": "pub fn z() { crate::d::w(); }\n",
}


class ModuleGraphTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        for path, text in CRATE.items():
            full = os.path.join(cls.dir.name, "src", path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w", encoding="utf-8") as f:
                f.write(text)

    @classmethod
    def tearDownClass(cls):
        cls.dir.cleanup()

    def run_script(self, *args):
        src = os.path.join(self.dir.name, "src")
        p = subprocess.run([sys.executable, SCRIPT, "--src", src, *args], capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout

    def edges(self, out):
        """The graph as printed: `  NODE -> A, B` lines, before the circles."""
        graph = {}
        for line in out.splitlines()[1:]:
            if not line.startswith("  ") or line.startswith("   ") or line.startswith("  CIRCLE"):
                break
            node, uses = line.split(" -> ")
            graph[node.strip()] = uses.strip()
        return graph

    def test_top_level_edges_and_the_circle(self):
        code, out = self.run_script()
        self.assertEqual(code, 1, out)
        self.assertEqual(
            self.edges(out),
            {"a": "b, c", "b": "c", "c": "f", "d": "e", "e": "d", "f": "(nothing)"},
            out,
        )
        self.assertIn("CIRCLE: d <-> e", out)
        self.assertIn("d -> e  (d.rs:1)", out)
        self.assertEqual(out.count("CIRCLE"), 1, out)

    def test_folder_level(self):
        code, out = self.run_script("--level", "folder", "b")
        self.assertEqual(code, 0, out)
        self.assertIn("(mod) -> child", out)
        self.assertIn("inner -> child", out)
        self.assertIn("child -> (nothing)", out)
        self.assertNotIn("tests", out)
        self.assertIn("no circle", out)

    def test_unknown_folder_is_a_usage_error(self):
        code, _ = self.run_script("--level", "folder", "nope")
        self.assertEqual(code, 2)


if __name__ == "__main__":
    unittest.main()
