"""DPM-Solver sampling (CompVis ``ldm.models.diffusion.dpm_solver`` package)."""

from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
