"""Parses meshfed's /metrics with Prometheus' own Python client, for tests/debug_surface.rs.

Usage: parse_metrics.py FILE

Parses FILE with prometheus_client's text-format parser (the Prometheus exposition format 0.0.4) and
prints, as JSON on stdout, every metric family:
{"<family>": {"type": "counter", "help": "...", "samples": [["<sample name>", {labels}, value], ...]}}.
Exits 1 with a message on stderr if the text does not parse, or a family has no HELP or TYPE.
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        text = f.read()
    out = {}
    try:
        for family in text_string_to_metric_families(text):
            if family.type == "unknown" or not family.documentation:
                print(f"metric {family.name} has no TYPE or no HELP", file=sys.stderr)
                return 1
            samples = []
            for s in family.samples:
                value = s.value
                if isinstance(value, float) and math.isinf(value):
                    value = "+Inf" if value > 0 else "-Inf"
                samples.append([s.name, dict(s.labels), value])
            out[family.name] = {"type": family.type, "help": family.documentation, "samples": samples}
    except Exception as e:  # the parser raises ValueError and friends
        print(f"/metrics does not parse: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
