"""Training memory per image of the model zoo (issue 4): see ``revsnn_triton.bench.memory`` (``--help``).

    python benchmarks/bench_memory.py --out benchmarks/results          # GPU
    python benchmarks/bench_memory.py --cpu-small --out /tmp/memory     # CPU, tiny widths
"""
import sys

from revsnn_triton.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
