"""relayd: a privacy-preserving business-chat relay on RabbitMQ."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml is the one place the version is written; the installed metadata
    # carries it here, so that a wheel, a venv and the Debian package cannot disagree.
    __version__ = version("relayd")
except PackageNotFoundError:  # run from a bare source tree, never installed
    __version__ = "0+unknown"
