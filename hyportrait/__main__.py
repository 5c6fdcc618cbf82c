import sys

from hyportrait.cli import main

sys.exit(main())
