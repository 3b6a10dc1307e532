"""The autograder's student-side process (shipped in autograder.zip as probe_worker.py).

Started by grader.py as an unprivileged throwaway user, in a folder holding only the submission's diffusion.py
and the public test_diffusion.py. It only computes: it reads the probe requests (inputs drawn by the grader at
grading time) as JSON from stdin, says "ready" once torch is imported (before any student code runs), imports
the submission, runs each probe and writes one JSON line of plain numbers per request to its original stdout.
Its stdout and stderr otherwise go to a size-limited log. Nothing here is trusted: the grader judges the numbers
in another process, against the reference solution this process cannot read.
"""
import json
import os
import sys
import traceback


def main():
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # prints of the submission go to the log, not into the protocol
    requests = json.loads(sys.stdin.read())
    sys.stdin.close()
    sys.path.insert(0, os.getcwd())
    import torch  # noqa: F401 - imported before the submission: "ready" means the interpreter works for this user

    torch.set_num_threads(1)
    protocol.write(json.dumps({"ready": True}) + "\n")
    try:
        import diffusion  # noqa: F401 - the submission
    except BaseException as exc:  # noqa: BLE001 - report whatever the import did
        text = "".join(traceback.format_exception(exc))[-3000:]
        protocol.write(json.dumps({"import_error": text}) + "\n")
        protocol.flush()
        os._exit(0)
    import test_diffusion as td

    protocol.write(json.dumps({"imported": True}) + "\n")
    protocol.flush()
    for index, request in requests:
        out = td.run_request(diffusion, request)
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
