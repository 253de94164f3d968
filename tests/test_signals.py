"""plumbing/signals.py: Ctrl-C and SIGTERM are noted and the loop stops after saving; a second Ctrl-C stops at
once; run_guard puts the handlers back and ends a bad checkpoint in one line; a loss that is not finite ends
the run naming the step and the checkpoint that is intact."""
import signal
from dataclasses import replace

import pytest
import torch

import train
from conftest import TINY
from plumbing.checkpoints import CheckpointError
from plumbing.signals import catch_stop_signals, run_guard, stopped

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_signal_is_noted_and_a_second_one_is_not_caught():
    with pytest.raises(SystemExit) as exit:
        with run_guard():
            seen = catch_stop_signals()
            signal.raise_signal(signal.SIGTERM)  # noted, the process goes on
            assert seen == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second one ends the process at once
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_DFL, signal.default_int_handler)
            raise CheckpointError("out/class.pt is damaged")
    assert str(exit.value) == "error: out/class.pt is damaged"  # one line
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers it found, put back
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_stopped_says_how_to_resume(capsys):
    assert stopped(3, 6, "stage class", "out/class.last.pt", [signal.SIGTERM], 0) == signal.SIGTERM
    assert capsys.readouterr().err == ("\nstopped at step 3/6 of stage class: saved out/class.last.pt; run the same "
                                       "command again to resume\n")


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    loss, calls = train.Diffusion.loss, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        return loss(self, *args, **kwargs) * (float("nan") if len(calls) == 5 else 1.0)
    monkeypatch.setattr(train.Diffusion, "loss", poisoned)
    with pytest.raises(SystemExit) as err:
        train.main(replace(TINY, save_every=2, out=str(tmp_path)))
    assert str(err.value) == (f"error: loss is nan at step 5 of stage class; {tmp_path}/class.last.pt (step 4) "
                              "is intact; try a lower --lr")
    ckpt = torch.load(tmp_path / "class.last.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(v.isfinite().all() for v in ckpt["model"].values())
