"""Where the Hydra configs (conf/) are.

Order: the environment variable ``FLOWLAB_CONF``; the ``conf/`` folder of the source checkout this
package runs from (``pip install -e .``, the supported way); a ``conf/`` folder packaged inside
``flowlab`` (for builds that ship it as package data).
"""

from __future__ import annotations

import os
from pathlib import Path

from flowlab.errors import UserError

__all__ = ["config_dir"]


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
