"""For Dataflow's ``--setup_file ./setup.py``: Beam builds this project's sdist with it and installs it on
every worker. The package itself is described in pyproject.toml."""

from setuptools import setup

setup()
