import sys

from mariner_dev.cli import main

sys.exit(main())
