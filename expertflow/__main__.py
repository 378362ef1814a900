import sys

from expertflow.cli import main

sys.exit(main())
