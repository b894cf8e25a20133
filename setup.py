"""Package discovery, the one thing pyproject.toml cannot say: passes/ installs as ``onnxopt_passes``.

``[tool.setuptools.packages.find]`` names a package by its folder, so it would install passes/ as
``passes``; here the same discovery runs and the names are mapped. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

PASSES = "onnxopt_passes"  # the import name of passes/ (see [tool.setuptools.package-dir])

setup(packages=[*find_packages(include=["onnxopt", "onnxopt.*"]),
                *(PASSES + name[len("passes"):] for name in find_packages(include=["passes", "passes.*"]))])
