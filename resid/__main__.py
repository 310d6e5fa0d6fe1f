import sys

from resid.cli import main

sys.exit(main())
