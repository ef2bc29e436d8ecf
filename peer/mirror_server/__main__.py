"""``python -m peer.mirror_server serve|generate ...``"""

from peer.mirror_server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
