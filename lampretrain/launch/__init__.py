"""Launching recipes on clusters: profiles, validation, Slurm/Kubernetes rendering, submission, local rehearsal."""

from .plan import LaunchPlan
from .profile import ClusterProfile, load_profile
from .validate import LaunchError, validate

__all__ = ["ClusterProfile", "LaunchError", "LaunchPlan", "load_profile", "validate"]
