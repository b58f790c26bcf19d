"""The one place the Kiln version lives (pyproject reads it too)."""

__version__ = "0.1.0"

# Bumped whenever the layout of an engine directory changes in a way older readers cannot load.
ENGINE_FORMAT_VERSION = 1
