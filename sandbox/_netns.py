"""Run a command in a network namespace of its own: ``python _netns.py ARGV...`` (stdlib only).

Why: bubblewrap's ``--unshare-net`` makes the namespace and then *adds* 127.0.0.1 to ``lo`` over
netlink. A gVisor whose new network namespace already has that address answers EEXIST, and
bubblewrap stops at "loopback: Failed RTM_NEWADDR" (google/gvisor#13438, open). Here the
namespace is made first and ``lo`` is only brought up if it is down (``zygote/root.loopback_up``: no
address is ever added, so one that is already there is fine); bubblewrap then runs inside it
without ``--unshare-net`` (``bwrap-ownnet`` mode, ``sandbox/isolation.py``). Inherited file
descriptors (the zygote's slot sockets) pass through ``execvp`` unchanged.
"""

import os
import sys
from pathlib import Path


def main(argv):
    # Run as a script with -I (no script directory on sys.path): the zygote's modules lie beside.
    sys.path.insert(0, str(Path(__file__).resolve().parent / "zygote"))
    import root
    import syscalls

    syscalls.unshare(syscalls.CLONE_NEWNET)
    root.loopback_up()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
