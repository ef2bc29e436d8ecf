"""``python -m tracker --listen HOST:PORT --ttl SECONDS``"""

import sys

from tracker.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m tracker"))
