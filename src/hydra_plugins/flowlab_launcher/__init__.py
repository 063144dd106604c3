"""The Hydra plugin of flowlab's launcher (``hydra/launcher=slurm``). Hydra finds launchers only among classes
defined in the ``hydra_plugins`` namespace, so the class the config names is declared here; its code is
:class:`flowlab.cluster.RequeueSubmititLauncher`.
"""

from flowlab import cluster as _cluster


class RequeueSubmititLauncherPlugin(_cluster.RequeueSubmititLauncher):
    __doc__ = _cluster.RequeueSubmititLauncher.__doc__


__all__ = ["RequeueSubmititLauncherPlugin"]
