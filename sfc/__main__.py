import sys

from sfc.cli import main

sys.exit(main())
