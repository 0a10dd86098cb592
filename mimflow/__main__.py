import sys

from mimflow.cli import main

sys.exit(main())
