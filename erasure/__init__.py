"""Separable concept erasure (CiE / SepCE) for Stable Diffusion v1.x on the project's ldm package.

Import the submodules you need (``erasure.loading``, ``erasure.convert``, ...); this package
file stays import-light on purpose so that command lines start fast.
"""
