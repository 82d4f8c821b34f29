"""`python -m dsv4_compile <command>`: see dsv4_compile/cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
