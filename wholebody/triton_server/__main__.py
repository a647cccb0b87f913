"""`python -m wholebody.triton_server ...`: see `wholebody.triton_server.cli`."""

from __future__ import annotations

import sys

from wholebody.triton_server.cli import build_parser, main

__all__ = ["build_parser", "main"]  # build_parser: tests/test_docs.py parses the docs' commands with it

if __name__ == "__main__":
    sys.exit(main())
