"""Hydra finds launchers only among classes defined in ``hydra_plugins``: ``hydra/launcher=slurm`` names this one,
whose code is :class:`flowlab.cluster.RequeueSubmititLauncher`."""

from flowlab import cluster as _cluster


class RequeueSubmititLauncherPlugin(_cluster.RequeueSubmititLauncher):
    __doc__ = _cluster.RequeueSubmititLauncher.__doc__
