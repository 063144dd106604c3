"""A stand-in ``srun`` for the one case a real SLURM daemon cannot exercise here: writing the sbatch script
of a job the test cluster could never run (2 nodes × 4 GPUs). submitit's SLURM executor refuses to start
without ``srun`` on PATH; the script text it generates is then checked without submitting it.

Every real submission (DDP jobs, job arrays, SIGUSR1 and requeue) runs on the real one-node cluster in
tests/cluster/ (``make test-cluster``).
"""

from __future__ import annotations

import os
from pathlib import Path

_SRUN = "#!/bin/sh\necho 'fake srun (tests/distributed/fakeslurm.py): runs nothing' >&2\nexit 1\n"


def install(bin_dir: Path) -> Path:
    """Write the stub ``srun`` into ``bin_dir``; put ``bin_dir`` first on PATH."""
    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "srun"
    path.write_text(_SRUN)
    os.chmod(path, 0o755)
    return bin_dir
