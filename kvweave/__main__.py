import sys

from kvweave.cli import main

sys.exit(main())
