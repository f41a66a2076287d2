"""Trainers: SepCE (joint, sequential), CiE and the ESD baselines, on one model copy under Lightning Fabric.

Modules: ``loop`` (the shared training loop), ``runtime`` (Fabric, seeded global batches,
gradient averaging), ``checkpoint``, ``data`` (training images -> latents), ``weights``
(trainers of ordinary UNet weights), ``sepce``, ``cie``, ``esd``, ``report`` (before/after
grid and accuracy table) and ``cli`` (the scripts' shared flags and driver).
"""
