"""`python demo.py "a lighthouse at dusk"`: text-to-image (and, with --init-image, image-to-image) from the
command line; `python demo.py --help` lists the options. The same as `python -m sd`."""

import sys

from sd.cli import main

if __name__ == "__main__":
    sys.exit(main())
