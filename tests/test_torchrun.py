"""plumbing/torchrun.py: several processes (torchrun, gloo on the CPU) train what one process trains, stop together,
and resume in another number of processes. Also the unit parts: the mean loss and the stop flag of one all-reduce."""
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import train
from conftest import ONE_THREAD_ENV, ROOT, TINY, argv, assert_same_weights, interrupt_at
from plumbing.checkpoints import weights_hash
from plumbing.latent import load_autoencoder
from plumbing.torchrun import mean_over_processes, start_processes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert start_processes(TINY) == (0, 1, TINY)
    loss, stopping = mean_over_processes(torch.tensor(2.5), [], 1, "cpu")
    assert (loss, stopping) == (2.5, 0.0)
    assert mean_over_processes(torch.tensor(1.0), [2], 1, "cpu")[1] == 1.0  # a signal seen: stop


DDP_WORKER = """
import hashlib, os, signal, sys
import torch
sys.path.insert(0, {root!r})
import train

hashes, update_ema = [], train.update_ema
def spy(ema, model, decay):  # after each step: a hash of this process's parameters; a Ctrl-C at step 3
    update_ema(ema, model, decay)
    hashes.append(hashlib.sha256(torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()).hexdigest())
    if len(hashes) == 3 and os.environ["RANK"] == "0":
        signal.raise_signal(signal.SIGINT)
train.update_ema = spy
try:
    train.main(train.parse_args())
finally:
    torch.save(hashes, f"hashes{{os.environ['RANK']}}.pt")
"""


def test_torchrun_two_processes_match_one_and_resume_on_one(tmp_path, monkeypatch):
    cfg = replace(TINY, steps=6)
    (tmp_path / "worker.py").write_text(DDP_WORKER.format(root=ROOT))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(torchrun + ["worker.py", *argv(cfg), "--out", "ddp"], cwd=tmp_path, env=ONE_THREAD_ENV,
                          capture_output=True, text=True)
    assert "stopped at step 3/6" in proc.stderr, proc.stderr[-3000:]  # rank 0's Ctrl-C stops both at once
    h0, h1 = torch.load(tmp_path / "hashes0.pt"), torch.load(tmp_path / "hashes1.pt")
    assert h0 == h1 and len(h0) == 3  # both processes hold the same parameters after every step

    # one process, the same global batch, stopped at the same step
    one = tmp_path / "one"
    interrupt_at(monkeypatch, train, "update_ema", 3)
    with pytest.raises(SystemExit):
        train.main(replace(cfg, out=str(one)))
    monkeypatch.undo()
    assert_same_weights(one / "class.last.pt", tmp_path / "ddp" / "class.last.pt", atol=1e-5)

    # the 2-process run resumed in one process ends where the 1-process run ends
    train.main(replace(cfg, out=str(one)))
    train.main(replace(cfg, out=str(tmp_path / "ddp")))
    assert_same_weights(one / "class.pt", tmp_path / "ddp" / "class.pt", atol=1e-5)


def test_torchrun_two_processes_train_the_same_autoencoder_as_one(latent_run, tmp_path):
    """(a real run) --latent under torchrun: one DDP autoencoder, the latents encoded once, both stages."""
    cfg, out = latent_run
    args = argv(replace(cfg, out=str(tmp_path / "ddp")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          env=ONE_THREAD_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(d / "autoencoder.pt", weights_only=True) for d in (out, tmp_path / "ddp"))
    for k, v in one["autoencoder"].items():
        torch.testing.assert_close(two["autoencoder"][k], v, atol=1e-5, rtol=1e-4)  # the same global batches
    ae, _ = load_autoencoder(tmp_path / "ddp" / "autoencoder.pt")
    assert torch.load(tmp_path / "ddp" / "order.pt", weights_only=True)["autoencoder"]["sha256"] == \
        weights_hash(ae.state_dict())
