"""`python -m wholebody.triton_server ...`: see `wholebody.triton_server.cli`."""

from __future__ import annotations

import sys

from wholebody.triton_server.cli import main

sys.exit(main())
