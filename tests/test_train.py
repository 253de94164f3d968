"""Training you can trust: exact resume, kills at any moment, torchrun, and the guards' messages.

Everything runs the tiny UNet on 16x16 toy images with one thread per process, so
that a run takes seconds and its arithmetic is the same in every process.
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
import torch.nn as nn
from PIL import Image

import model
import train
from plumbing.checkpoints import build_model, by_name, load_checkpoint
from taxonomy import Taxonomy
from train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = TrainConfig(level="class", size="tiny", image_size=16, per_species=2, batch_size=8, steps=6,
                   grid_cols=2, grid_steps=2, device="cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: one thread, as in this process (see one_thread)


def flags(cfg):
    """The command line that gives this TrainConfig."""
    args = []
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [] if v is False else [flag, str(v)]  # bools are switches
    return args


pytestmark = pytest.mark.usefixtures("one_thread")


def interrupt_at(monkeypatch, step):
    """A SIGINT (Ctrl-C) to this process during training step `step`: train.py saves after that step and stops."""
    calls = []

    def update_ema(*args):
        train_update_ema(*args)
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
    train_update_ema = train.update_ema
    monkeypatch.setattr(train, "update_ema", update_ema)


def tensors(path):
    ckpt = torch.load(path, weights_only=True)
    opt = [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    return ckpt, list(ckpt["model"].values()) + list(ckpt["ema"].values()) + opt


def assert_same_weights(a, b, atol=0.0):
    (ca, ta), (cb, tb) = tensors(a), tensors(b)
    assert ca["step"] == cb["step"] and len(ta) == len(tb)
    for x, y in zip(ta, tb):
        if atol:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)
        else:
            assert torch.equal(x, y)  # bit for bit


def test_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = replace(TINY, level="order", save_every=4)  # the order stage starts from class.pt
    train.main(replace(cfg, out=str(tmp_path / "straight")))
    out = tmp_path / "resumed"
    interrupt_at(monkeypatch, 6 + 2)  # in the order stage
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
    args = flags(replace(cfg, out=str(tmp_path / "killed")))
    last, tmp, done = (tmp_path / "killed" / name for name in ["class.last.pt", "class.last.pt.tmp", "class.pt"])
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER.format(root=ROOT), *args], env=ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def stamp(path):
        return path.stat().st_mtime_ns if path.exists() else None
    rng, kills, mid_save, step = random.Random(0), 0, 0, 0
    while kills < 10 and not done.exists():
        last_seen, tmp_seen = stamp(last), stamp(tmp)
        server.stdin.write("run\n"), server.stdin.flush()
        pid = int(server.stdout.readline())
        aim_at_save = kills % 2 == 1  # every other kill lands while a checkpoint is being written
        while not done.exists() and (stamp(tmp) in (None, tmp_seen) if aim_at_save else stamp(last) == last_seen):
            time.sleep(0.0005)
        if not aim_at_save:
            time.sleep(rng.uniform(0, 0.2))  # a random moment after it has made progress
        os.kill(pid, signal.SIGKILL)
        server.stdin.write(f"wait {pid}\n"), server.stdin.flush()
        if int(server.stdout.readline()) != -signal.SIGKILL:
            break  # it finished first
        kills += 1
        mid_save += tmp.exists() and stamp(tmp) != tmp_seen
        latest = torch.load(done if done.exists() else last, weights_only=True)  # whole, and plain data
        assert latest["step"] >= step
        step = latest["step"]
    server.stdin.close(), server.wait()
    print(f"{kills} kills, {mid_save} while saving, the last at step {step}")
    assert kills >= 10 and mid_save >= 1
    # the last resume is the real command line, in a process of its own
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=ENV, check=True, capture_output=True)
    assert_same_weights(tmp_path / "straight" / "class.pt", done)


DDP_WORKER = """
import hashlib, os, signal, sys
import torch
sys.path.insert(0, {root!r})
import model
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
    proc = subprocess.run(torchrun + ["worker.py", *flags(cfg), "--out", "ddp"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True)
    assert "stopped at step 3/6" in proc.stderr, proc.stderr[-3000:]  # rank 0's Ctrl-C stops both at once
    h0, h1 = torch.load(tmp_path / "hashes0.pt"), torch.load(tmp_path / "hashes1.pt")
    assert h0 == h1 and len(h0) == 3  # both processes hold the same parameters after every step

    # one process, the same global batch, stopped at the same step
    one = tmp_path / "one"
    interrupt_at(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train.main(replace(cfg, out=str(one)))
    monkeypatch.undo()
    assert_same_weights(one / "class.last.pt", tmp_path / "ddp" / "class.last.pt", atol=1e-5)

    # the 2-process run resumed in one process ends where the 1-process run ends
    train.main(replace(cfg, out=str(one)))
    train.main(replace(cfg, out=str(tmp_path / "ddp")))
    assert_same_weights(one / "class.pt", tmp_path / "ddp" / "class.pt", atol=1e-5)


class FakeCompiled(nn.Module):
    """Stands in for torch.compile's wrapper (whose own state_dict keys start with '_orig_mod.'), without compiling."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod, self.calls = module, 0

    def forward(self, *args):
        self.calls += 1
        return self._orig_mod(*args)


def test_compiled_run_saves_the_plain_module(tmp_path, monkeypatch):
    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda m: wrappers.append(FakeCompiled(m)) or wrappers[-1])
    train.main(replace(TINY, steps=2, compile=True, out=str(tmp_path)))
    assert wrappers and wrappers[0].calls == 2  # the steps ran through the wrapper
    ckpt = torch.load(tmp_path / "class.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    build_model(ckpt).load_state_dict(ckpt["ema"])  # and it loads into a plain model


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


def test_unwritable_out_fails_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(model, "load_data", None)  # training would need the data first
    with pytest.raises(SystemExit, match=r"^error: cannot write to --out .*/file/out: "):
        train.main(replace(TINY, out=str(tmp_path / "file" / "out")))


def test_amp_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --amp is bf16 autocast for CUDA"):
        train.main(replace(TINY, amp=True, out=str(tmp_path)))


def test_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    out = tmp_path / "out"
    train.main(replace(TINY, steps=2, out=str(out)))
    runs = {"image size": (replace(TINY, steps=2, level="order", image_size=8),
                           "trained with --image-size 16, this run has --image-size 8"),
            "network": (replace(TINY, steps=2, level="order", size="small"),
                        "trained with --size tiny, this run has --size small")}
    # a finished stage is reused only by a run that would have trained it alike (an ablation into an old --out)
    for flag, value, shown in (("schedule", "all", "all"), ("seed", 1, 1), ("lr", 2e-3, 0.002), ("steps", 3, 3),
                               ("loss_weight", "eps", "eps"), ("p_cut", 0.0, 0.0)):
        name = "--" + flag.replace("_", "-")
        runs[flag] = (replace(replace(TINY, steps=2), **{flag: value}),  # out/class.pt is this run's whole result
                      f"class.pt was trained with {name} {getattr(replace(TINY, steps=2), flag)}, this run has "
                      f"{name} {shown}")
    # the default --noise-schedule auto was recorded as what it meant in pixels, Ho's linear betas
    runs["noise schedule"] = (replace(TINY, steps=2, noise_schedule="scaled-linear"),
                              "class.pt was trained with --noise-schedule linear, this run has --noise-schedule "
                              "scaled-linear")
    # another taxonomy: a folder tree of two species not in the toy tree
    for species in ["Felis catus", "Felis silvestris"]:
        folder = tmp_path / "tree" / "Mammalia" / "Carnivora" / "Felidae" / "Felis" / species
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (40 * i, 90, 200)).save(folder / f"{i}.png")
    runs["taxonomy"] = (replace(TINY, level="order", data=str(tmp_path / "tree")), "was trained on another taxonomy "
                        "(lineages only in the data: 2 (e.g. 'Mammalia/Carnivora/Felidae/Felis/Felis catus'); "
                        "lineages only in the checkpoint: 48 (e.g. 'Animalia/")
    for what, (cfg, message) in runs.items():
        with pytest.raises(SystemExit) as err:
            train.main(replace(cfg, out=str(out)))
        assert message in str(err.value) and "\n" not in str(err.value), what
        assert str(err.value).endswith(f"use the flags it was trained with, another --out, or delete {out}/class.pt")

    # other ranks
    ckpt = torch.load(out / "class.pt", weights_only=True)
    torch.save({**ckpt, "ranks": ckpt["ranks"][1:]}, out / "class.pt")
    with pytest.raises(SystemExit, match="class.pt has ranks phylum/class/.*/species, this run kingdom/phylum/"):
        train.main(replace(TINY, level="order", out=str(out)))

    # resuming a stage with another flag that changes what it computes
    torch.save({**ckpt, "step": 1}, out / "class.last.pt")
    os.remove(out / "class.pt")
    with pytest.raises(SystemExit, match=r"class.last.pt was trained with --lr 0.001, this run has --lr 0.002;"):
        train.main(replace(TINY, steps=2, lr=2e-3, out=str(out)))

    # resuming a stage written by an older train.py that had no --cooldown
    old_cfg = {k: v for k, v in ckpt["train_config"].items() if k != "cooldown"}
    torch.save({**ckpt, "step": 1, "train_config": old_cfg}, out / "class.last.pt")
    with pytest.raises(SystemExit, match=r"^error: \S*class.last.pt was written before --cooldown existed, so this "
                                         r"train.py cannot resume or reuse it; delete it to train this stage again"):
        train.main(replace(TINY, steps=2, out=str(out)))
    assert (out / "class.last.pt").exists()  # refused, not deleted

    # ... but one written before --noise-schedule existed was trained with Ho's linear betas: it resumes under
    # that value and is refused, naming the value it had, under another
    old_cfg = {k: v for k, v in ckpt["train_config"].items() if k != "noise_schedule"}
    torch.save({**ckpt, "step": 1, "train_config": old_cfg}, out / "class.last.pt")
    with pytest.raises(SystemExit, match=r"class.last.pt was trained with --noise-schedule linear, this run has "
                                         r"--noise-schedule scaled-linear;"):
        train.main(replace(TINY, steps=2, noise_schedule="scaled-linear", out=str(out)))
    train.main(replace(TINY, steps=2, out=str(out)))  # linear: resumed at step 1, no SystemExit
    assert (out / "class.pt").exists() and not (out / "class.last.pt").exists()

    # resuming a stage that numbers the taxa in another order: its optimizer state is in its own id order
    ckpt = torch.load(out / "class.pt", weights_only=True)
    vocab = [list(names) for names in ckpt["vocab"]]
    vocab[2] = vocab[2][:1] + vocab[2][1:][::-1]  # the classes listed backwards ("<unknown>" stays id 0)
    torch.save({**ckpt, "step": 1, "vocab": vocab}, out / "class.last.pt")
    os.remove(out / "class.pt")
    with pytest.raises(SystemExit, match=r"^error: \S*class.last.pt numbers the taxa in another order than the data "
                                         r"lists them; delete it to train this stage again$"):
        train.main(replace(TINY, steps=2, out=str(out)))


def test_stage_checkpoints_map_taxa_by_name():
    a = [("Animalia", None, "Aves", "Passeriformes", None, None, None),
         ("Animalia", None, "Aves", "Strigiformes", None, None, None),
         ("Animalia", None, "Insecta", None, None, None, None)]
    ours, theirs = Taxonomy(a), Taxonomy(a[::-1])  # the same taxa, listed in another order
    assert ours.vocab[3] != theirs.vocab[3]
    state = {f"conditioner.embed.{r}.weight": torch.arange(len(v)).float()[:, None] for r, v in enumerate(theirs.vocab)}
    moved = by_name(state, theirs.vocab, ours)
    for r, names in enumerate(ours.vocab):
        for i, name in enumerate(names):  # our row for each name holds the checkpoint's row for that name
            assert moved[f"conditioner.embed.{r}.weight"][i].item() == theirs.vocab[r].index(name)
    # Leaves at two ranks: the data's order of first appearance is not the order its lineages rebuild, which is
    # what sample.py does (Taxonomy(ckpt["lineages"])); train.py numbers taxa in the rebuilt order.
    mixed = [("Animalia", None, "Aves", "Passeriformes", "Paridae", "Parus", "Parus major"),
             ("Animalia", None, "Aves", "Passeriformes", "Paridae", "Poecile", None)]
    as_listed, rebuilt = Taxonomy(mixed), Taxonomy(Taxonomy(mixed).lineages())
    assert as_listed.vocab[5] == ["<unknown>", "Parus", "Poecile"]
    assert rebuilt.vocab[5] == ["<unknown>", "Poecile", "Parus"]
    assert Taxonomy(rebuilt.lineages()).vocab == rebuilt.vocab


def test_learning_rate_warms_up_then_cools_down_in_the_last_stage_only(tmp_path):
    # steps 1..10 of a stage with 2 warm-up and 4 cool-down steps, as fractions of --lr
    assert [train.lr_factor(s, 10, 2, 4) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [train.lr_factor(s, 4, 2, 0) for s in range(4)] == [0.5, 1, 1, 1]
    train.main(replace(TINY, level="order", warmup=2, cooldown=0.5, out=str(tmp_path)))
    lr = {level: torch.load(tmp_path / f"{level}.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
          for level in ("class", "order")}
    assert lr == {"class": TINY.lr, "order": 0.0}  # after each stage's last step: only the last stage decayed


def test_attention_path_is_a_free_choice_between_stages(tmp_path):
    """--attention changes how attention is computed, not what: a stage trained with one path continues with
    another; the checkpoint records the path it ran, and sample.py and fid.py rebuild the network with the
    path that suits their own machine ("auto"), so a GPU run with --attention triton samples on a CPU."""
    train.main(replace(TINY, attention="sdpa", out=str(tmp_path)))
    assert torch.load(tmp_path / "class.pt", weights_only=True)["unet_config"]["attention_impl"] == "sdpa"
    train.main(replace(TINY, level="order", attention="torch", out=str(tmp_path)))  # from class.pt, no refusal
    order = torch.load(tmp_path / "order.pt", weights_only=True)
    assert order["unet_config"]["attention_impl"] == "torch"
    assert build_model(order).unet.cfg.attention_impl == "auto"
    # a checkpoint from a GPU run with --attention triton loads and runs here, on the CPU
    torch.save({**order, "unet_config": {**order["unet_config"], "attention_impl": "triton"}}, tmp_path / "gpu.pt")
    model, _ = load_checkpoint(str(tmp_path / "gpu.pt"))
    ids = torch.tensor([Taxonomy(order["lineages"]).ancestors(3, 1)])  # one order's lineage ids: (1, R)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():  # the same function as the checkpoint that ran "torch"
        torch.testing.assert_close(model(x, t, ids), load_checkpoint(str(tmp_path / "order.pt"))[0](x, t, ids),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit):  # and the flag only takes the four paths
        train.parse_args(["--attention", "flash"])


def test_a_resumed_stage_keeps_its_cool_down_under_another_level(tmp_path, monkeypatch):
    """--level class cools the class stage down (it is the command's last); stopped, then resumed by
    --level order, it still does: the stage keeps the schedule it started with, so resume stays bit for bit."""
    cfg = replace(TINY, cooldown=0.5, save_every=1)
    train.main(replace(cfg, out=str(tmp_path / "straight")))
    interrupt_at(monkeypatch, 2)
    with pytest.raises(SystemExit):
        train.main(replace(cfg, out=str(tmp_path / "resumed")))
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "class.last.pt", weights_only=True)["cooldown_steps"] == 3
    train.main(replace(cfg, level="order", out=str(tmp_path / "resumed")))
    assert_same_weights(tmp_path / "straight" / "class.pt", tmp_path / "resumed" / "class.pt")
    order = torch.load(tmp_path / "resumed" / "order.pt", weights_only=True)
    assert order["optimizer"]["param_groups"][0]["lr"] == 0.0  # order, the new last stage, cooled down too


def test_the_loop_trains_with_the_noise_schedule_the_checkpoint_records(tmp_path, monkeypatch):
    """--noise-schedule reaches the training loss, not only the checkpoint that sample.py reads."""
    used = []
    monkeypatch.setattr(train, "Diffusion", lambda cfg: used.append(cfg.schedule) or model.Diffusion(cfg))
    train.main(replace(TINY, steps=1, noise_schedule="scaled-linear", out=str(tmp_path)))
    ckpt = torch.load(tmp_path / "class.pt", weights_only=True)
    assert used == ["scaled-linear"] and ckpt["diffusion_config"]["schedule"] == "scaled-linear"
    # the default, auto, is Ho's linear betas in pixels (LDM's on latents: test_latent.py), recorded as such
    train.main(replace(TINY, steps=1, out=str(tmp_path / "auto")))
    ckpt = torch.load(tmp_path / "auto" / "class.pt", weights_only=True)
    assert used[-1] == "linear" and ckpt["diffusion_config"]["schedule"] == "linear"
    assert ckpt["train_config"]["noise_schedule"] == "linear"
