"""Text-to-image from the command line. The sampling pipeline is not built yet: until it lands, this reports the
networks that are (`python -m sd.inspect` has the full tree)."""

import sys

from sd.inspect import main

if __name__ == "__main__":
    print("sd: the text-to-image pipeline is not built yet; these are the networks it will run:\n")
    sys.exit(main(["--depth", "0"]))
