"""Neuron benchmark: see ``revsnn_triton.bench.neurons`` (``--help`` for options).

    python benchmarks/bench_neurons.py --out benchmarks/results
"""
import sys

from revsnn_triton.bench.neurons import main

if __name__ == "__main__":
    sys.exit(main())
