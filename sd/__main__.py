import sys

from sd.cli import main

sys.exit(main())
