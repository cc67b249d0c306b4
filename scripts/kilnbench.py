"""What kiln's benchmark scripts share: the build they measure, a real
`kiln serve` on a free loopback port, what /proc says about its processes
(CPU, memory, its zygotes), and percentiles.

Imported by the `scripts/bench*` programs, which put this directory on
`sys.path`; not a program itself.
"""
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


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
    background, so it never blocks on a full pipe. When the script exits,
    the server is stopped if the script has not stopped it, and its data
    directory removed."""
    data = tempfile.mkdtemp(prefix=prefix)
    p = subprocess.Popen([kiln, "serve", "--listen", "127.0.0.1:0", "--data-dir", data, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **popen)
    atexit.register(_clean_up, p, data)
    for line in p.stdout:
        m = re.match(r"kiln ready on http://[\d.]+:(\d+) \(runtime (\S+)\)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, int(m.group(1)), m.group(2), data
    sys.exit(f"kiln serve {' '.join(args)} did not start")


def _clean_up(p, data):
    """Stop server `p` (SIGTERM: it stops its sessions and unmounts what it
    mounted in `data`), then remove `data`."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    shutil.rmtree(data, ignore_errors=True)


def proc_cpu(pid):
    """CPU seconds of live process `pid` so far (all its threads, user and
    system, not its reaped children); 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_cpu():
    """(busy, total) CPU seconds of the whole machine so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v) - idle) / TICK, sum(v) / TICK


def zygotes(server):
    """The pids of the zygotes of `kiln serve` process `server`: its
    children running `kiln_kernel.zygote`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server and b"kiln_kernel.zygote" in cmd:
            out.append(int(d))
    return out


def pss_of(pids):
    """Proportional set size of the processes `pids` together, in bytes
    (a process gone meanwhile counts nothing)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except OSError:
            pass
    return total


def cpu_model():
    """The machine's CPU model, as /proc/cpuinfo names it."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")


def pct(xs, p):
    """The p-th percentile of `xs` (nearest rank); NaN without samples."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")
