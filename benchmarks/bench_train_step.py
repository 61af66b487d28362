"""Training-step time of the model zoo (needs CUDA): see ``revsnn_triton.bench.train_step`` (``--help``).

    python benchmarks/bench_train_step.py --out benchmarks/results
"""
import sys

from revsnn_triton.bench.train_step import main

if __name__ == "__main__":
    sys.exit(main())
