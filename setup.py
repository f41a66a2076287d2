"""Which files the package installs; everything else about it is in pyproject.toml.

Besides the ``ldm`` and ``erasure`` packages, the wheel ships the embedded toy model and its
config, so that a non-editable ``pip install .`` runs the toy default too. They stay where the
repository keeps them (``models/toy/``, ``configs/toy/``) and are mapped to
``erasure/_resources/`` inside the wheel, where ``erasure.resources`` looks for them.
"""

from setuptools import find_packages, setup

#: installed package -> (repository folder, its files that ship)
RESOURCES: dict[str, tuple[str, list[str]]] = {
    "erasure._resources.configs.toy": ("configs/toy", ["*.yaml"]),
    "erasure._resources.data": ("data", ["toy-heldout-wordings.csv"]),
    "erasure._resources.models.toy": ("models/toy", ["*.json", "*.safetensors"]),
    "erasure._resources.models.toy.text_encoder": ("models/toy/text_encoder", ["*.json", "*.txt"]),
}

setup(
    packages=find_packages(include=["ldm", "ldm.*", "erasure", "erasure.*"]) + list(RESOURCES),
    package_dir={package: folder for package, (folder, _) in RESOURCES.items()},
    package_data={package: patterns for package, (_, patterns) in RESOURCES.items()},
)
