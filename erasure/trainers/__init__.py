"""Trainers: SepCE (joint, sequential), CiE and the ESD baselines, on one model copy under Lightning Fabric.

Modules: ``loop`` (the shared training loop), ``runtime`` (Fabric, seeded global batches,
gradient averaging), ``checkpoint``, ``data`` (training images -> latents), ``weights``
(trainers of ordinary UNet weights), ``sepce``, ``cie``, ``esd`` and ``report`` (before/after
grid and accuracy table). ``erasure.training`` is their public front.
"""
