"""Redraw the neuron benchmark's bar plot from its JSON results (no GPU needed).

    python benchmarks/plot_results.py benchmarks/results/<run>/neurons.json [--out neurons.png]
"""
import argparse
import json
import sys
from pathlib import Path

from revsnn_triton.bench.neurons import plot


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="neurons.json written by the neuron benchmark")
    p.add_argument("--out", type=Path, help="PNG path (default: next to the JSON, same stem)")
    args = p.parse_args(argv)
    try:
        data = json.loads(args.results.read_text())
        rows, env, title = data["rows"], data["environment"], data["title"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"plot_results: cannot read {args.results}: {exc}", file=sys.stderr)
        return 2
    out = args.out or args.results.with_suffix(".png")
    if plot(rows, out, f"{title}\n{env.get('device')}, {env.get('date_utc')}") is None:
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
