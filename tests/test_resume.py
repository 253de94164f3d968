"""Resuming after a stop: a run stopped by Ctrl-C, or SIGKILLed at random moments (half of them mid-save), and
resumed by the same command ends bit for bit where an uninterrupted run ends; so does the autoencoder stage.

Everything runs the tiny UNet on 16x16 toy images with one thread per process, so that a run takes seconds.
"""
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import train
from conftest import ONE_THREAD_ENV, ROOT, TINY, argv, assert_same_weights, interrupt_at, run_script
from plumbing import latent

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = replace(TINY, level="order", save_every=4)  # the order stage starts from class.pt
    train.main(replace(cfg, out=str(tmp_path / "straight")))
    out = tmp_path / "resumed"
    interrupt_at(monkeypatch, train, "update_ema", 6 + 2)  # in the order stage
    with pytest.raises(SystemExit) as stopped:
        train.main(replace(cfg, out=str(out)))
    assert stopped.value.code == 128 + signal.SIGINT
    last = torch.load(out / "order.last.pt", weights_only=True)
    assert last["step"] == 2 and not (out / "order.pt").exists()
    monkeypatch.undo()
    steps, real_ema = [], train.update_ema  # the weights alone cannot tell a resume from a restart (both seeded)
    monkeypatch.setattr(train, "update_ema", lambda *a: steps.append(1) or real_ema(*a))
    train.main(replace(cfg, out=str(out)))  # the same command again
    assert len(steps) == 6 - 2  # the order stage's steps after the saved one, and no more
    assert not (out / "order.last.pt").exists()
    for level in ["class", "order"]:
        assert_same_weights(tmp_path / "straight" / f"{level}.pt", out / f"{level}.pt")


# A process that has paid for the imports (torch, and torch._dynamo, which the first optimizer imports: ~8 s
# together here) and then forks one train.py run per line it reads: each child is a fresh process running
# train.main on the same command line, killed as cheaply as it starts. It prints the child's pid, and on
# "wait" the child's exit status. (One torch thread: a fork is safe with no thread pool started.)
FORK_SERVER = """
import os, sys
sys.path.insert(0, {root!r})
import torch, torch._dynamo, train
cfg = train.parse_args(sys.argv[1:])
for line in sys.stdin:
    if line.startswith("wait"):
        print(os.waitstatus_to_exitcode(os.waitpid(int(line.split()[1]), 0)[1]), flush=True)
        continue
    pid = os.fork()
    if pid == 0:  # the child: train, quietly (stdout is the pipe to the test)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        code = 1
        try:
            train.main(cfg)
            code = 0
        finally:  # never back into this loop: a failed run exits 1, and the test sees it
            os._exit(code)
    print(pid, flush=True)
"""


def test_killed_at_random_moments_then_resumed_equals_uninterrupted(tmp_path):
    cfg = replace(TINY, steps=24, save_every=1)
    train.main(replace(cfg, out=str(tmp_path / "straight")))
    args = argv(replace(cfg, out=str(tmp_path / "killed")))
    last, done = tmp_path / "killed" / "class.last.pt", tmp_path / "killed" / "class.pt"
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER.format(root=ROOT), *args], env=ONE_THREAD_ENV,
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def stamp(path):
        return path.stat().st_mtime_ns if path.exists() else None
    rng, kills, mid_save, step = random.Random(0), 0, 0, 0
    while kills < 10 and not done.exists():
        last_seen = stamp(last)
        tmp = last.with_name("class.last.pt.tmp")  # where a checkpoint is written before its rename (atomic_write)
        tmp.unlink(missing_ok=True)  # a kill mid-write leaves it (the next write replaces it): look for a fresh one
        server.stdin.write("run\n"), server.stdin.flush()
        pid = int(server.stdout.readline())
        aim_at_save = kills % 2 == 1  # every other kill lands while a checkpoint is being written
        while not done.exists() and (not tmp.exists() if aim_at_save else stamp(last) == last_seen):
            time.sleep(0.0005)
        if not aim_at_save:
            time.sleep(rng.uniform(0, 0.2))  # a random moment after it has made progress
        os.kill(pid, signal.SIGKILL)
        server.stdin.write(f"wait {pid}\n"), server.stdin.flush()
        if int(server.stdout.readline()) != -signal.SIGKILL:
            break  # it finished first
        kills += 1
        mid_save += tmp.exists()  # killed between the temporary file's creation and its rename
        latest = torch.load(done if done.exists() else last, weights_only=True)  # whole, and plain data
        assert latest["step"] >= step
        step = latest["step"]
    server.stdin.close(), server.wait()
    print(f"{kills} kills, {mid_save} while saving, the last at step {step}")
    assert kills >= 10 and mid_save >= 1
    # the last resume is the real command line, in a process of its own
    run_script("train.py", *args, env=ONE_THREAD_ENV, check=True)
    assert_same_weights(tmp_path / "straight" / "class.pt", done)


def test_a_resumed_stage_keeps_its_cool_down_under_another_level(tmp_path, monkeypatch):
    """--level class cools the class stage down (it is the command's last); stopped, then resumed by
    --level order, it still does: the stage keeps the schedule it started with, so resume stays bit for bit."""
    cfg = replace(TINY, cooldown=0.5, save_every=1)
    train.main(replace(cfg, out=str(tmp_path / "straight")))
    interrupt_at(monkeypatch, train, "update_ema", 2)
    with pytest.raises(SystemExit):
        train.main(replace(cfg, out=str(tmp_path / "resumed")))
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "class.last.pt", weights_only=True)["cooldown_steps"] == 3
    train.main(replace(cfg, level="order", out=str(tmp_path / "resumed")))
    assert_same_weights(tmp_path / "straight" / "class.pt", tmp_path / "resumed" / "class.pt")
    order = torch.load(tmp_path / "resumed" / "order.pt", weights_only=True)
    assert order["optimizer"]["param_groups"][0]["lr"] == 0.0  # order, the new last stage, cooled down too


def test_the_autoencoder_stage_resumes_exactly(latent_run, tmp_path, monkeypatch):
    cfg, out = latent_run
    interrupt_at(monkeypatch, latent, "autoencoder_loss", 4)
    with pytest.raises(SystemExit):
        train.main(replace(cfg, out=str(tmp_path), level="class"))
    monkeypatch.undo()
    train.main(replace(cfg, out=str(tmp_path), level="class"))
    a, b = torch.load(out / "autoencoder.pt", weights_only=True), torch.load(tmp_path / "autoencoder.pt",
                                                                              weights_only=True)
    assert a["psnr"] == b["psnr"]
    for k, v in a["autoencoder"].items():
        assert torch.equal(v, b["autoencoder"][k]), k  # bit for bit with the uninterrupted run


def test_every_new_checkpoint_opens_with_weights_only(latent_run, tmp_path, monkeypatch):
    cfg, out = latent_run
    for name in ("autoencoder.pt", "class.pt", "order.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert isinstance(ckpt, dict)
    # the resumable one, written when the autoencoder stage is stopped (Ctrl-C at its 3rd step)
    interrupt_at(monkeypatch, latent, "autoencoder_loss", 3)
    with pytest.raises(SystemExit) as exit:
        train.main(replace(cfg, out=str(tmp_path)))
    assert exit.value.code == 128 + signal.SIGINT
    last = torch.load(tmp_path / "autoencoder.last.pt", weights_only=True)
    assert last["step"] == 3 and {"autoencoder", "optimizer", "scheduler", "rng"} <= set(last)
