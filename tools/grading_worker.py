"""The autograder's student-side process (shipped in autograder.zip as probe_worker.py).

Started by grader.py as an unprivileged throwaway user, in a folder holding only the submission's diffusion.py
and the public test_diffusion.py and grading.py (the probes). It only computes: it reads the probe requests
(inputs drawn by the grader at grading time) as a JSON line on stdin, says "ready" once torch is imported, waits
for the grader's "go" (it measures the interpreter's own memory meanwhile, before any student code runs), imports
the probes, then the submission, runs each probe and writes one JSON line of plain numbers per request to its
original stdout.
Its stdout and stderr otherwise go to a size-limited log. Nothing here is trusted: the grader judges the numbers
in another process, against the reference solution this process cannot read.
"""
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import traceback
import types

# The course's packages that the grader does not install (it has torch, numpy, tqdm and pytest), and the handout's
# other modules, which are not in the grading folder. A diffusion.py may import them without needing them for the
# graded functions (the original skeleton imports wandb; students import unet, torchvision or matplotlib), so an
# import of one *by the submission* gets an inert stand-in instead of failing the whole submission. The same in
# every environment, installed or not: a grade does not depend on where it runs. tests/test_autograder.py checks
# that this covers requirements.txt and the handout's modules.
STAND_INS = frozenset({"torchvision", "scipy", "PIL", "matplotlib", "cleanfid", "requests", "wandb",
                       "unet", "utils", "trainer", "main", "kit"})


class StandIn:
    """Whatever the submission does with a stand-in does nothing: attributes and calls give stand-ins (a call
    with a single function, as a decorator, gives the function back), it is false, empty and a context manager."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return StandIn(f"{self._name}.{attribute}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], StandIn):
            return args[0]
        return StandIn(f"{self._name}(...)")

    def __bool__(self):
        return False

    def __iter__(self):
        return iter(())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self):
        return f"<grader stand-in for {self._name}>"


class StandInModule(types.ModuleType):
    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return StandIn(f"{self.__name__}.{attribute}")


class StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the submission's own imports of STAND_INS (and their submodules); every other import, torch's
    own included, goes to the real finders."""

    def __init__(self):
        self.used = set()

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in STAND_INS or not self._imported_by_submission():
            return None
        self.used.add(name.split(".")[0])
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    @staticmethod
    def _imported_by_submission():
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        return frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "diffusion"

    def create_module(self, spec):
        module = StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def enter_pid_namespace():
    """Where the grader gave this process a PID namespace for its children (unshare(CLONE_NEWPID) moves only the
    children, and a process whose children live elsewhere cannot start threads), go on as the first child: the
    namespace's init, so that every process the submission starts ends when this one does. The parent stays
    outside only to pass on the exit code; if it is killed, the init is killed with it (parent-death signal)."""
    try:  # a PID namespace for the children that has no process yet reads as missing
        os.readlink("/proc/self/ns/pid_for_children")
        return
    except FileNotFoundError:
        pass
    except OSError:
        return
    child = os.fork()
    if child == 0:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        return
    for fd in (0, 1):  # the pipes belong to the init now: the grader sees their end when it ends
        os.close(fd)
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    os._exit(code if code >= 0 else 128 - code)


def main():
    enter_pid_namespace()
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints of the submission go to the log, not into the protocol
    requests = json.loads(sys.stdin.readline())
    sys.path.insert(0, os.getcwd())
    import torch  # noqa: F401 - imported before the submission: "ready" means the interpreter works for this user

    torch.set_num_threads(1)
    protocol.write(json.dumps({"ready": True}) + "\n")
    if sys.stdin.readline() != "go\n":  # the grader measures this interpreter's memory before student code runs
        os._exit(0)
    sys.stdin.close()
    import grading  # the probes; imported before the submission, which then cannot put a module of its own there

    stand_ins = StandInFinder()
    sys.meta_path.insert(0, stand_ins)
    try:
        import diffusion  # noqa: F401 - the submission
    except BaseException as exc:  # noqa: BLE001 - report whatever the import did
        text = "".join(traceback.format_exception(exc))[-3000:]
        protocol.write(json.dumps({"import_error": text}) + "\n")
        protocol.flush()
        os._exit(0)
    protocol.write(json.dumps({"imported": True, "stand_ins": sorted(stand_ins.used)}) + "\n")
    protocol.flush()
    for index, request in requests:
        out = grading.run_request(diffusion, request)
        try:
            line = json.dumps({"i": index, "out": out})
        except (TypeError, ValueError) as exc:
            line = json.dumps({"i": index, "out": {"error": f"the probe's output could not be sent ({exc})"}})
        protocol.write(line + "\n")
        protocol.flush()
    protocol.write(json.dumps({"done": True}) + "\n")
    protocol.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)  # no atexit handlers or finalizers of the submission


if __name__ == "__main__":
    main()
