"""``python -m services.dlq list|show|redrive ...``; ``--help`` explains each command."""

import sys

from services.dlq.cli import main

if __name__ == "__main__":
    sys.exit(main())
