"""
Stopping: Ctrl-C (SIGINT) or SIGTERM (a preemption) is noted, and the loop saves after its step and stops; the
same command then resumes. run_guard puts the handlers back, parts the processes and turns a bad checkpoint
into one line, however the run ends.
"""
import contextlib
import signal
import sys

import torch.distributed as dist

from plumbing.checkpoints import CheckpointError


@contextlib.contextmanager
def run_guard():
    """Around train.py's run: the signal handlers it found are put back and the process group (torchrun, also
    with one process) ended however it ends, and a checkpoint that cannot be read or written ends in one line."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def catch_stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM (preemption) only note the signal; the loop saves and stops after its step.

    A second Ctrl-C stops at once (the last checkpoint is still whole). Returns the list of signals seen.
    """
    seen = []

    def note(signum, frame):
        seen.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, note)
    return seen


def stopped(step, steps, what, last_path, stop, rank):
    """A loop stopped by a signal, after saving: says how to resume; returns the signal's number."""
    if rank == 0:
        print(f"\nstopped at step {step}/{steps} of {what}: saved {last_path}; run the same command again to resume",
              file=sys.stderr)
    return stop[0] if stop else signal.SIGINT


def loss_error(loss, step, what, last_path, saved, lr_flag, rank):
    """What a loss that is not finite ends the run with (process 0's line; the others exit with 1): these weights
    are lost, the checkpoint on disk is not."""
    kept = f"{last_path} (step {saved}) is intact" if saved else "no checkpoint of this stage was written"
    return f"error: loss is {loss} at step {step} of {what}; {kept}; try a lower {lr_flag}" if rank == 0 else 1
