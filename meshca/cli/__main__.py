"""`python -m meshca.cli`: the `meshca` command."""

import sys

from meshca.cli.main import main

sys.exit(main())
