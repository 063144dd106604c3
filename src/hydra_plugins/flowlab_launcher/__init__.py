"""flowlab's Hydra launcher plugin. Hydra takes launchers only from classes defined in the ``hydra_plugins``
namespace, so the class ``hydra/launcher=slurm`` names is defined here; its code is
:class:`flowlab.cluster.SlurmLauncher`.
"""

from flowlab import cluster as _cluster


class SlurmLauncher(_cluster.SlurmLauncher):
    __doc__ = _cluster.SlurmLauncher.__doc__


__all__ = ["SlurmLauncher"]
