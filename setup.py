"""Package discovery (the rest of the metadata is in pyproject.toml).

``kernels/`` sits at the repository root and installs as ``otcore.kernels``; every subpackage
of either folder is found here, so a new one needs no edit (tests/test_packaging.py checks the
built wheel).
"""

from setuptools import find_packages, setup


def _subpackages(folder: str, name: str) -> list[str]:
    return [name, *(f"{name}.{sub}" for sub in find_packages(folder))]


setup(
    packages=_subpackages("otcore", "otcore") + _subpackages("kernels", "otcore.kernels"),
    package_dir={"otcore": "otcore", "otcore.kernels": "kernels"},
)
