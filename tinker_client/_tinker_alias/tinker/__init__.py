"""`import tinker` in a process started under `python -m tinker_client.as_tinker`: installs the
alias, then stands aside for tinker_client (the import system returns sys.modules["tinker"])."""

import sys

from tinker_client.as_tinker import install

install()
sys.modules[__name__] = __import__("tinker_client")
