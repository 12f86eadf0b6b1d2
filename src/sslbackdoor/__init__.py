"""sslbackdoor: backdoor attacks on pre-trained self-supervised image encoders, and defenses.

The stages are plain functions usable from Python; the CLI (`sslbackdoor ...`) is a thin
wrapper over them.
"""

from sslbackdoor.errors import UserInputError

__version__ = "0.1.0"
__all__ = ["UserInputError", "__version__"]
