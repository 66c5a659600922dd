"""A tiny package that examples/plan.json installs."""

__version__ = "1.0"


def greet(name: str = "world") -> str:
    """Say hello."""
    return f"hello, {name}, from hello {__version__}"
