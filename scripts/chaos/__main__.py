"""`python -m scripts.chaos` (`make chaos`): see scripts/chaos/__init__.py."""

import asyncio
import sys

from scripts.chaos.harness import main, parser

sys.exit(asyncio.run(main(parser().parse_args())))
