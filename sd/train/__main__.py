import sys

from sd.train.cli import main

sys.exit(main())
