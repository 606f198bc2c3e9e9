"""What the report scripts of loadtest/ share: logging, ports, a server's memory, the e2e
suite's Deno CLI, and rewriting one marked section of a document."""

import glob
import os
import re
import resource
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def rss_kib(pid):
    """The resident memory of process `pid`, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1))


def find_deno():
    """The Deno CLI tests/e2e/run.sh installed (from npm, into $E2E_CACHE)."""
    cache = Path(os.environ.get("E2E_CACHE", Path.home() / ".cache/denokv/e2e"))
    for c in glob.glob(str(cache / "node_modules/@deno/linux-*/deno")) + [str(cache / "node_modules/deno/deno")]:
        if os.access(c, os.X_OK):
            return c
    raise SystemExit("no Deno: run tests/e2e/run.sh once (it installs Deno from npm)")


def write_section(path, begin, end, title, text):
    """Replaces what lies between the markers `begin` and `end` in the document at `path` with
    `text`; a document without them gets a new section `title` at its end."""
    doc = path.read_text() if path.exists() else ""
    if begin not in doc:
        doc += f"\n## {title}\n\n{begin}\n{end}\n"
    doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", doc, flags=re.S)
    path.write_text(doc)


def raise_open_files(need):
    """Lifts the soft open-files limit to the hard one; exits when that is below `need`."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < need:
        raise SystemExit(f"the open files limit ({hard}) is below {need}")


def release_binary():
    """The release server in $CARGO_TARGET_DIR (default ~/.cache/denokv/target)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/denokv/target"))
    return target / "release/denokv"
