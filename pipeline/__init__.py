"""binding-pipeline: the package's version is its installed distribution's."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("binding-pipeline")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
