"""``python -m moetrain ...`` is the ``moetrain`` command (for torchrun, srun and mpiexec lines)."""

import sys

from moetrain.launch.cli import main

sys.exit(main())
