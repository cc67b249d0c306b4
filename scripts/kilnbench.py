"""What kiln's benchmark scripts share: the build they measure, a real
`kiln serve` on a free loopback port, and percentiles.

Imported by the `scripts/bench*` programs, which put this directory on
`sys.path`; not a program itself.
"""
import os
import re
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def binary(debug=False):
    """The kiln binary to measure: `KILN_BIN` when it is set (a build kept
    for an A/B run), else a fresh build (release unless `debug`) of kiln and
    of the sandbox library its zygote loads."""
    if os.environ.get("KILN_BIN"):
        return os.path.abspath(os.environ["KILN_BIN"])
    build = ["cargo", "build", "--quiet", "-p", "kiln", "-p", "kiln-sandbox"] + ([] if debug else ["--release"])
    subprocess.run(build, cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "debug" if debug else "release", "kiln")


def serve(kiln, args, prefix="kiln-bench-", **popen):
    """Start `kiln serve` with `args` on a free loopback port and a new data
    directory. Returns (process, port, runtime directory, data directory)
    once it has said it is ready; what it prints later is read in the
    background, so it never blocks on a full pipe."""
    data = tempfile.mkdtemp(prefix=prefix)
    p = subprocess.Popen([kiln, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **popen)
    for line in p.stdout:
        m = re.match(r"kiln ready on http://[\d.]+:(\d+) \(runtime (\S+)\)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, int(m.group(1)), m.group(2), data
    sys.exit(f"kiln serve {' '.join(args)} did not start")


def pct(xs, p):
    """The p-th percentile of `xs` (nearest rank); NaN without samples."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")
