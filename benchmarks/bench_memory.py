"""Training memory per image of the model zoo: see ``revsnn_triton.bench.memory`` (``--help``).

    python benchmarks/bench_memory.py --models RevSResNet37 MS-ResNet34     # the device's default batches
    python benchmarks/bench_memory.py --sweep --cpu-small                   # CPU, tiny widths, against depth
"""
import sys

from revsnn_triton.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
