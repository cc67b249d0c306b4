"""What the zygote builds before it forks kernels (the lean kernel's
``zygote_prepare``, then the zygote's ``_warm_shell``), in a process of its
own (IPython's shell is a per-process singleton): a kernel forked from it
finds its first cell's machinery built, and the shell's state as a new
kernel's.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest

# Run in a fresh interpreter: prepare as the zygote's main does, fork as it
# does, run a first cell (not silent, as a session's is) in the child, report.
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from kiln_kernel import kernel, zygote
    kernel.zygote_prepare()
    zygote._warm_shell()
    shell = kernel._prepared.shell
    state = {
        "execution_count": shell.execution_count,
        "user_names": sorted(k for k in shell.user_ns if not k.startswith("_")),
        "inputs": list(shell.user_ns["In"]),
        "history": list(shell.history_manager.get_range(raw=True)),
    }
    zygote_profile = shell.profile_dir.location
    unplaced = id(kernel._prepared.unplaced_profile)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        # Adopted as a kernel of a session whose home is new and empty.
        os.environ["HOME"] = home = sys.argv[1]
        before = set(sys.modules)
        kernel._prepared.adopt_connection({"key": "k"})
        profile = shell.profile_dir.location
        startup = shell.profile_dir.startup_dir
        kernel._prepared.warm_up()
        warmed = {
            "execution_count": shell.execution_count,
            "inputs": list(shell.user_ns["In"]),
            "history": list(shell.history_manager.get_range(raw=True)),
        }
        result = shell.run_cell("x = 1", store_history=True)
        new = sorted(set(sys.modules) - before)
        os.write(w, json.dumps({
            "new": new, "ok": result.success, "x": shell.user_ns.get("x"), "home": home,
            "profile": profile, "zygote_profile": zygote_profile, "startup": startup,
            "readme": os.path.isfile(os.path.join(startup, "README")),
            "dirs": sorted(os.listdir(profile)),
            "built_before_the_fork": id(shell.profile_dir) == unplaced,
            "warmed": warmed, "count": shell.execution_count,
        }).encode())
        os._exit(0)
    os.close(w)
    child = json.loads(os.read(r, 1 << 16).decode())
    os.waitpid(pid, 0)
    print(json.dumps({"state": state, "child": child}))
    """
)


class ZygotePrepareTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        home = tempfile.mkdtemp(prefix="kiln-zygote-home-")
        cls.addClassCleanup(shutil.rmtree, home)
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, home], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        if out.returncode != 0:
            raise AssertionError(f"the prepared-kernel script failed:\n{out.stderr}")
        cls.report = json.loads(out.stdout.strip().splitlines()[-1])

    def test_a_forked_kernels_first_cell_imports_no_module(self):
        child = self.report["child"]
        self.assertTrue(child["ok"])
        self.assertEqual(child["x"], 1)
        self.assertEqual(child["new"], [])

    def test_an_adopted_kernel_has_its_profile_directory_in_the_sessions_home(self):
        child = self.report["child"]
        self.assertEqual(child["profile"], os.path.join(child["home"], ".ipython", "profile_default"))
        self.assertNotEqual(child["profile"], child["zygote_profile"])
        self.assertEqual(child["startup"], os.path.join(child["profile"], "startup"))
        self.assertTrue(child["readme"])
        self.assertEqual(child["dirs"], ["log", "pid", "security", "startup"])
        # The object built in the zygote, only placed in the child.
        self.assertTrue(child["built_before_the_fork"])

    def test_the_kernels_own_warm_up_cell_leaves_no_trace(self):
        child = self.report["child"]
        self.assertEqual(child["warmed"], {"execution_count": 1, "inputs": [""], "history": []})
        # The first real cell is the session's cell 1.
        self.assertEqual(child["count"], 2)

    def test_the_prepared_shell_has_run_no_cell(self):
        state = self.report["state"]
        self.assertEqual(state["execution_count"], 1)
        self.assertEqual(state["user_names"], ["In", "Out", "exit", "get_ipython", "open", "quit"])
        self.assertEqual(state["inputs"], [""])
        self.assertFalse(state["history"])


if __name__ == "__main__":
    unittest.main()
