"""``python -m revsnn_triton`` = the ``revsnn`` command (train / bench / tune)."""
import sys

from .cli import main

sys.exit(main())
