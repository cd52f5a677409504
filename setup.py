"""For Dataflow's ``--setup_file ./setup.py`` on top of the worker container (``dataflow/Dockerfile``):
Beam builds this project's sdist with it and each worker installs it as ``pip install`` of the sdist,
without extras, so the worker dependencies must already be in the container. The package itself is
described in pyproject.toml."""

from setuptools import setup

setup()
