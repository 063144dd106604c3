"""Where the Hydra configs are: ``$FLOWLAB_CONF``, the source checkout's ``conf/`` or one packaged in ``flowlab``."""

from __future__ import annotations

import os
from pathlib import Path

from flowlab.errors import UserError


def config_dir() -> Path:
    here = Path(__file__).resolve()
    env = os.environ.get("FLOWLAB_CONF")
    candidates = [Path(env).expanduser()] if env else []
    candidates += [here.parents[3] / "conf",  # <repo>/src/flowlab/cli/_config.py -> <repo>/conf
                   here.parents[1] / "conf"]  # <site-packages>/flowlab/conf
    for c in candidates:
        if (c / "train.yaml").is_file():
            return c.resolve()
    if env:
        raise UserError(f"FLOWLAB_CONF={env} holds no train.yaml: point it at flowlab's conf/ folder")
    raise UserError("cannot find flowlab's config folder (conf/ with train.yaml); looked in "
                    + ", ".join(str(c) for c in candidates)
                    + ". Install flowlab from its source checkout with `pip install -e .` or set FLOWLAB_CONF")
