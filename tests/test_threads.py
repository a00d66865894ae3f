"""How many threads fastsal takes, and how its idle threads wait: the CPUs a process may use (affinity,
cgroup quotas, on fake cgroup trees), the settings that override them, and a child process whose
OpenMP team really has the size asked for."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastsal
from fastsal import _threads

TESTS = Path(__file__).resolve().parent


def cgroup_tree(tmp_path, proc_lines: str, files: dict[str, str]):
    (tmp_path / "proc_cgroup").write_text(proc_lines)
    for name, text in files.items():
        path = tmp_path / "fs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path / "fs"), str(tmp_path / "proc_cgroup")


@pytest.mark.parametrize(
    "proc_lines, files, quota",
    [
        ("0::/job\n", {"cpu.max": "max 100000\n", "job/cpu.max": "150000 100000\n"}, 1.5),
        ("0::/a/b\n", {"a/cpu.max": "50000 100000\n", "a/b/cpu.max": "max 100000\n"}, 0.5),  # an ancestor's
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        (
            "3:cpu,cpuacct:/docker/x\n",
            {
                "cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n",
                "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n",
            },
            3.0,
        ),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ("1:memory:/x\n", {}, None),
    ],
    ids=["v2", "v2-ancestor", "v2-unlimited", "v1", "v1-unlimited", "no-cpu-controller"],
)
def test_cgroup_quota(tmp_path, proc_lines, files, quota):
    root, proc = cgroup_tree(tmp_path, proc_lines, files)
    assert _threads._cgroup_cpu_limit(root, proc) == quota
    cpus = len(os.sched_getaffinity(0))
    expected = cpus if quota is None else min(cpus, max(1, -(-int(quota * 10) // 10)))
    assert _threads.available_cpus(root, proc) == expected


def test_a_quota_below_one_cpu_still_gives_one_thread(tmp_path):
    root, proc = cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "10000 100000\n"})
    assert _threads.available_cpus(root, proc) == 1


def test_default_threads_follow_the_settings(monkeypatch):
    monkeypatch.delenv(_threads.THREADS_VARIABLE, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _threads.default_threads() == _threads.available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3,2")
    assert _threads.default_threads() == 3
    monkeypatch.setenv(_threads.THREADS_VARIABLE, "5")
    assert _threads.default_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")  # libgomp ignores it, and so does fastsal
    monkeypatch.delenv(_threads.THREADS_VARIABLE)
    assert _threads.default_threads() == _threads.available_cpus()
    for bad in ("zero", "0", "1_0", "+3", "100000"):
        monkeypatch.setenv(_threads.THREADS_VARIABLE, bad)
        with pytest.raises(
            ValueError, match=f"FASTSAL_NUM_THREADS must be an integer from 1 to .*, got '{re.escape(bad)}'"
        ):
            _threads.default_threads()
        # An explicit count never reads it; build_info reports it instead of failing.
        assert "FASTSAL_NUM_THREADS must be" in fastsal.build_info()["threads"]


def run_child(code: str, **env) -> subprocess.CompletedProcess:
    """Fresh interpreters: libgomp reads its settings once, when fastsal loads it."""
    settings = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", _threads.THREADS_VARIABLE)
    environment = {k: v for k, v in os.environ.items() if k not in settings}
    environment.update(env)
    prelude = f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


TEAM = """
    import os, pathlib, tempfile, numpy as np, fastsal
    from conftest import NETS, make_net
    net = make_net(pathlib.Path(tempfile.mkdtemp()), NETS["resnet_block_bn_scale_eltwise"][0])
    images = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    before = len(os.listdir("/proc/self/task"))
    saliency = fastsal.Saliency(net, {option})
    saliency.compute(images, [0, 1])
    print(saliency.threads, len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: every team has one thread")
def test_the_team_has_the_size_asked_for():
    """threads=1 starts no OpenMP thread; the default starts one per CPU beyond the caller's."""
    cpus = len(os.sched_getaffinity(0))
    for option, env, expected in [
        ("threads=1", {}, (1, 0)),
        ("", {}, (cpus, cpus - 1)),
        ("", {"FASTSAL_NUM_THREADS": "1"}, (1, 0)),
        ("threads=2", {"FASTSAL_NUM_THREADS": "1"}, (2, 1)),
    ]:
        child = run_child(TEAM.format(option=option), **env)
        assert child.returncode == 0, child.stderr[-2000:]
        assert tuple(map(int, child.stdout.split())) == expected, (option, env, child.stdout)


def test_exact_maps_do_not_depend_on_the_thread_count(tmp_path):
    import numpy as np

    import fastsal
    from conftest import NETS, make_net

    net = make_net(tmp_path, NETS["resnet_block_bn_scale_eltwise"][0])
    images = np.random.default_rng(1).standard_normal((3, 3, 10, 10)).astype(np.float32)
    one = fastsal.Saliency(net, threads=1)
    assert one.threads == 1 and fastsal.Attribution(net, "smoothgrad", threads=1, seed=0).threads == 1
    np.testing.assert_array_equal(
        one.compute(images, [1, 4]), fastsal.Saliency(net, threads=2).compute(images, [1, 4])
    )
    fastsal.compute(net, images, 0, threads=1)
    fastsal.attribute(net, images, 0, threads=1)
    for bad in (0, True, 1.0, 2**31, 100000):
        with pytest.raises(ValueError, match="threads must be an integer from 1 to"):
            fastsal.attribute(net, images, 0, threads=bad)
        with pytest.raises(ValueError, match="threads must be an integer from 1 to"):
            fastsal.Saliency(net, threads=bad)
        with pytest.raises(ValueError, match="threads must be an integer from 1 to"):
            fastsal.compute(net, images, 0, threads=bad)  # compute's cache holds a threads=1 engine now


WAIT = """
    import os, fastsal
    print(fastsal.build_info()["omp_wait"], "|", "GOMP_SPINCOUNT" in os.environ)
"""


def test_idle_threads_spin_briefly():
    """fastsal bounds libgomp's spinning (its default, 300,000 rounds, is what fights a neighbour
    process for the cores), leaves a user's own policy alone, and leaks no setting to child processes.
    libgomp itself reports what it read (OMP_DISPLAY_ENV)."""
    ours = run_child(WAIT, OMP_DISPLAY_ENV="verbose")
    assert ours.returncode == 0, ours.stderr[-2000:]
    assert f"GOMP_SPINCOUNT = '{_threads.SPINCOUNT}'" in ours.stderr
    assert ours.stdout.split("|")[0].strip() == f"GOMP_SPINCOUNT={_threads.SPINCOUNT} (fastsal's)"
    assert ours.stdout.split("|")[1].strip() == "False"
    theirs = run_child(WAIT, OMP_DISPLAY_ENV="verbose", OMP_WAIT_POLICY="active")
    assert "GOMP_SPINCOUNT = '30000000000'" in theirs.stderr
    assert theirs.stdout.startswith("yours: OMP_WAIT_POLICY=active")


def test_libgomp_loaded_before_fastsal_is_reported():
    """Then libgomp read its settings already: build_info says so rather than claim the bound."""
    child = run_child(
        """
        import ctypes
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL)
        import fastsal
        print(fastsal.build_info()["omp_wait"])
        """,
        OMP_DISPLAY_ENV="verbose",
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert "GOMP_SPINCOUNT = '300000'" in child.stderr
    assert child.stdout.strip() == "libgomp's default (libgomp was loaded before fastsal)"


def test_a_malformed_variable_does_not_stop_an_explicit_count():
    child = run_child(
        """
        import pathlib, tempfile, numpy as np, fastsal
        from conftest import NETS, make_net
        net = make_net(pathlib.Path(tempfile.mkdtemp()), NETS["conv_maxpool_fc_softmax"][0])
        images = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
        print(fastsal.compute(net, images, [0], threads=1).shape)
        """,
        FASTSAL_NUM_THREADS="junk",
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == "(2, 1, 12, 12)"
