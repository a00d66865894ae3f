"""How many threads fastsal uses, and how its idle threads wait. This module loads no native code: it
runs before fastsal's extension loads libgomp, which reads its waiting policy only then."""

from __future__ import annotations

import contextlib
import numbers
import os
import re
from pathlib import Path

THREADS_VARIABLE = "FASTSAL_NUM_THREADS"


def _read(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _cgroup_cpu_limit(root: str, proc_cgroup: str) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), the tightest on the
    way from this process's cgroup up to the root; None when unlimited or unknown."""
    try:
        entries = [line.split(":", 2) for line in Path(proc_cgroup).read_text().splitlines()]
    except OSError:
        return None
    limits = []
    for _, controllers, path in (e for e in entries if len(e) == 3):
        if controllers == "":  # v2: one unified hierarchy
            bases = [Path(root)]
        elif "cpu" in controllers.split(","):
            bases = [Path(root) / controllers, Path(root) / "cpu"]
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for base in bases:
            for depth in range(len(parts), -1, -1):
                folder = base.joinpath(*parts[:depth])
                if controllers == "":
                    values = _read(folder / "cpu.max")[:2]
                else:
                    values = _read(folder / "cpu.cfs_quota_us") + _read(folder / "cpu.cfs_period_us")
                if len(values) != 2 or values[0] in ("max", "-1"):
                    continue
                try:
                    quota, period = float(values[0]), float(values[1])
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    limits.append(quota / period)
    return min(limits) if limits else None


def available_cpus(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (a container's
    --cpus), not the machine's core count."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, int(-(-quota // 1))))
    return max(1, cpus)


def most_threads() -> int:
    """The largest thread count fastsal takes: a typo like 10000 would start 10,000 OS threads, and
    libgomp ends the process itself when it cannot create them."""
    return max(256, 4 * (os.cpu_count() or 1))


def check_threads(threads) -> None:
    if (
        isinstance(threads, bool)
        or not isinstance(threads, numbers.Integral)
        or not 1 <= threads <= most_threads()
    ):
        raise ValueError(f"threads must be an integer from 1 to {most_threads()}, got {threads!r}")


def default_threads() -> int:
    """fastsal's thread count when none is given: ``FASTSAL_NUM_THREADS`` if set, else OpenMP's own
    ``OMP_NUM_THREADS`` (its first level; ignored when malformed, as libgomp ignores it), else the CPUs
    this process may use (:func:`available_cpus`)."""
    ours = os.environ.get(THREADS_VARIABLE, "").strip()
    if ours:
        if not re.fullmatch(r"[0-9]+", ours) or not 1 <= int(ours) <= most_threads():
            raise ValueError(
                f"{THREADS_VARIABLE} must be an integer from 1 to {most_threads()}, got {ours!r}"
            )
        return int(ours)
    openmp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if re.fullmatch(r"[0-9]+", openmp) and 1 <= int(openmp) <= most_threads():
        return int(openmp)
    return available_cpus()


# At a barrier, libgomp's threads spin 300,000 rounds of `pause` before they sleep: beside another busy
# process, a thread spins away the time slice its descheduled partner needs (open_nsfw kept 0.30 of its
# speed beside a second fastsal). 1,000 rounds (tens of microseconds) still catch the next region of a
# call on an idle machine and yield under load (0.55 kept); 10,000 still collapsed (0.33), 0 cost more
# idle speed. Measured with bench/bench_contention.py (docs/design.md, "Threading").
SPINCOUNT = "1000"
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
wait_policy = "not set yet"  # what build_info reports


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            # Debian maps libgomp.so.1.0.0; torch's own copy (libgomp-<hash>.so.1) is another library
            return any(re.search(r"/libgomp\.so(\.[0-9]+)*$", line.rstrip()) for line in maps)
    except OSError:  # not Linux
        return False


@contextlib.contextmanager
def bounded_spinning():
    """Around the import of fastsal's extension: ``GOMP_SPINCOUNT`` in the environment while libgomp
    loads (it reads it then), unless the user chose a waiting policy; removed after, so that no child
    process inherits it."""
    global wait_policy
    chosen = {name: os.environ[name] for name in _WAIT_VARIABLES if name in os.environ}
    if chosen:
        wait_policy = "yours: " + ", ".join(f"{k}={v}" for k, v in chosen.items())
    elif _libgomp_loaded():
        wait_policy = "libgomp's default (libgomp was loaded before fastsal)"
    else:
        wait_policy = f"GOMP_SPINCOUNT={SPINCOUNT} (fastsal's)"
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        yield
    finally:
        if not chosen and os.environ.get("GOMP_SPINCOUNT") == SPINCOUNT:
            del os.environ["GOMP_SPINCOUNT"]
