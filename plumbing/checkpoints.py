"""
The checkpoint format: what a run's checkpoints record, the one atomic write, opening a file or refusing it in
one line that names it, the one checker that decides whether a checkpoint may continue a run, and taxa matched
by name. A checkpoint is plain data (state dicts, configs as dicts, the taxonomy as lists), so
torch.load(weights_only=True) opens it and the model is rebuilt from it with no flags re-typed.
"""
import contextlib
import errno
import hashlib
import io
import os
import pickle
import shutil
import zipfile
from dataclasses import asdict, fields

import torch

from model import DiffusionConfig, TaxaDiffusion
from taxonomy import RANKS, normalize
from unet import SIZES, AutoencoderConfig, UNetConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened, continued or saved; the message names the file and says why."""


# -----------------------------------------------------------------------------
# Writing: every file a run keeps goes through atomic_write


def atomic_write(path, data):
    """Write bytes so that a killed run leaves the old file or the new one, never half of one.

    The bytes go to a temporary file in the same folder and reach the disk (fsync) before a rename puts it
    in place; the rename is atomic, and the folder's fsync makes the rename itself durable. If the write
    fails (a full disk), the temporary file is removed and the old file stays as it was.
    """
    tmp = f"{path}.tmp"  # one name: a run killed while writing leaves it, and the next write replaces it
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C: no half-written .tmp stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(no_space_message(path, len(data))) from None
        raise
    if os.name == "posix":  # a folder can be opened and fsynced there
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, **state):
    """torch.save plain data with atomic_write (serialised in memory first: its size is what the disk must hold)."""
    data = io.BytesIO()
    torch.save(state, data)
    atomic_write(path, data.getbuffer())


def no_space_message(path, nbytes):
    """What a full disk ends in: where, how much was needed, and what is intact."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        try:  # its step, if it has one (a stage checkpoint has)
            step = f" (step {torch.load(path, weights_only=True, mmap=True)['step']})"
        except Exception:
            step = ""
        kept = f"the previous {path}{step} is intact"
    else:
        kept = f"no earlier {path} exists"
    return (f"no space left in {folder} to write {path}: it needs {nbytes / 1e6:,.1f} MB and "
            f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB are free; {kept}")


# -----------------------------------------------------------------------------
# Reading: a file opens, or one line says which way it is bad


def open_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of any file torch.save wrote, or one line saying which way the file is bad."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found: train one first with `python train.py`")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:  # a folder, no permission
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({e.strerror})") from None
    if head != b"PK\x03\x04":  # torch.save writes a zip archive, and every zip archive starts so
        raise CheckpointError(f"{path} is not a checkpoint ({'an empty file' if not head else 'not a zip archive'}: "
                              "torch.save writes zip archives)")
    if not zipfile.is_zipfile(path):  # the archive's directory, written last, is missing: the file was cut short
        raise CheckpointError(f"{path} is truncated (the end of its zip archive is missing): "
                              "copy it again, or delete it and train it again")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("/data.pkl") for name in archive.namelist()):
            raise CheckpointError(f"{path} is not a checkpoint: a zip archive, but not one torch.save wrote")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        if "Unsupported global" in str(e):  # weights_only met a class or function: rebuilding it runs code
            raise CheckpointError(f"{path} holds pickled Python objects, and only plain-data checkpoints are opened "
                                  "(tensors, numbers, strings, lists, dicts): no code from a file is run") from None
        why = "its pickled data is garbled" if isinstance(e, pickle.UnpicklingError) else str(e).split(". ")[0]
        raise CheckpointError(f"{path} is damaged ({why}): copy it again, or delete it and train it again") from None


CHECKPOINT_KEYS = ("ema", "unet_config", "vocab_sizes", "lineages")  # what rebuilds a model and names its taxa
CONFIGS = {"unet_config": UNetConfig, "diffusion_config": DiffusionConfig, "autoencoder_config": AutoencoderConfig}


def read_checkpoint(path, device="cpu", keys=CHECKPOINT_KEYS, what="a checkpoint of train.py"):
    """open_checkpoint, then refuse in one line a file that lacks `keys` or holds a config this code does not know
    (one written by another version: it is refused, never adapted)."""
    ckpt = open_checkpoint(path, device)
    if not isinstance(ckpt, dict) or not any(k in ckpt for k in keys):
        raise CheckpointError(f"{path} is not {what}: it holds no {', '.join(keys)}")
    differences = [f"no {k}" for k in keys if k not in ckpt] + [
        f"{name} {k}, unknown here" for name, cls in CONFIGS.items()
        for k in ckpt.get(name, {}) if k not in {f.name for f in fields(cls)}]
    if differences:
        raise CheckpointError(f"{path} was written by another version of train.py ({', '.join(differences)}): "
                              "train it again, or use the version that wrote it")
    return ckpt


def load_weights(module, state, path):
    """module.load_state_dict(state), or one line: weights that do not fit this version of the network."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = next((ln.strip().rstrip(".") for ln in lines if "size mismatch" in ln), lines[0])
        raise CheckpointError(f"{path}: its weights do not fit this version of the network ({first}); "
                              "train it again with `python train.py`") from None
    return module


def build_model(ckpt, attention="auto"):
    """A fresh TaxaDiffusion shaped like the one in the checkpoint. The attention path is the loading machine's
    choice, not the run's: every path computes the same function."""
    return TaxaDiffusion(UNetConfig(**{**ckpt["unet_config"], "attention_impl": attention}), ckpt["vocab_sizes"])


def load_checkpoint(path, device="cpu"):
    """Open a stage checkpoint and rebuild its EMA model: (model in eval mode, the checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    model = load_weights(build_model(ckpt), ckpt["ema"], path)
    return to_device(model, device).eval(), ckpt


def to_device(model, device):
    """Move a model to `device`. On a CPU its convolution weights also go channels-last (NHWC), the layout
    oneDNN's convolutions prefer; a GPU keeps the default layout, where it gained nothing (docs/results.md)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else model


def finest_checkpoint(folder):
    """The checkpoint of the finest rank trained in `folder` (out/species.pt before out/order.pt)."""
    found = [os.path.join(folder, f"{r}.pt") for r in RANKS if os.path.exists(os.path.join(folder, f"{r}.pt"))]
    if not found:
        raise CheckpointError(f"no stage checkpoint (<rank>.pt) in {folder}/: run `python train.py` first")
    return found[-1]


def weights_hash(state):
    """sha256 of a state dict's names and values: what names an autoencoder, whichever file holds it."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())  # contiguous: channels-last or not, one hash
    return h.hexdigest()


# -----------------------------------------------------------------------------
# What a run's checkpoints record, and whether one may continue this run


def network_configs(cfg):
    """The UNet and diffusion configs of a train.py run (cfg: its TrainConfig, --noise-schedule resolved).
    On latents the UNet sees (latent_channels, image_size / f, image_size / f) instead of (3, image_size, image_size)."""
    channels, size = (cfg.latent_channels, cfg.image_size // cfg.latent_f) if cfg.latent else (3, cfg.image_size)
    return (UNetConfig(in_channels=channels, image_size=size, attention_impl=cfg.attention, **SIZES[cfg.size]),
            DiffusionConfig(noise_schedule=cfg.noise_schedule))


def run_header(cfg, taxonomy, plan, autoencoder=None):
    """What every stage checkpoint of this run records, as plain data: the configs, the stages, the taxonomy, and on
    latents the autoencoder they belong to (its file, config and weights' hash: sample.py finds and checks it)."""
    unet_config, diffusion_config = network_configs(cfg)
    ae = autoencoder and dict(file="autoencoder.pt", config=asdict(autoencoder.cfg),
                              sha256=weights_hash(autoencoder.state_dict()))
    return dict(ranks=list(RANKS), stages=[RANKS[r] for r in plan], unet_config=asdict(unet_config),
                diffusion_config=asdict(diffusion_config), train_config=asdict(cfg), autoencoder=ae,
                vocab_sizes=[len(v) for v in taxonomy.vocab], vocab=taxonomy.vocab, lineages=taxonomy.lineages())


# Flags a stage may change when it resumes or is reused: where it runs, how often it saves, its grids and the
# arithmetic (--amp, --compile, --attention). Any other flag changes what the stage computes, so it must match.
FREE_ON_RESUME = ("level", "device", "out", "workers", "save_every", "amp", "compile", "attention",
                  "guidance", "guide_from", "grid_cols", "grid_steps", "grid_sampler", "grid_interval")
LATENT_FLAGS = ("latent", "latent_f", "latent_channels", "ae_steps", "ae_batch_size", "ae_crop", "ae_lr",
                "ae_edge_loss")
EXTEND_FLAGS = ("extend", "extend_steps", "extend_trains")


def stage_flags(cfg):
    """The flags a rank stage's checkpoint must share with this run: all but FREE_ON_RESUME, and on pixels all but
    the autoencoder's (and in a stage those of train.py --extend), which then change nothing."""
    free = FREE_ON_RESUME + (() if cfg.latent else LATENT_FLAGS) + (() if cfg.extend else EXTEND_FLAGS)
    return [k for k in asdict(cfg) if k not in free]


def check_checkpoint(ckpt, path, header, flags, resuming=False):
    """Refuse, in one line naming what differs, a checkpoint (a rank stage's or the autoencoder's) that cannot
    continue this run: what `header` records (run_header, or latent.py's) must match, and so must `flags`
    of its train_config. A resumed stage must also number the taxa alike, since its optimizer state is in
    its own id order; a finished stage is reordered by name (by_name)."""
    fix = f"use the flags it was trained with, another --out, or delete {path}"
    if "autoencoder" in header:  # a rank stage: pixels or latents, and of which autoencoder
        theirs, ours = ckpt.get("autoencoder"), header["autoencoder"]
        if (theirs or {}).get("sha256") != (ours or {}).get("sha256"):
            if theirs and ours:
                raise CheckpointError(f"{path} was trained on the latents of another autoencoder (weights sha256 "
                                      f"{theirs['sha256'][:12]}, this run's {ours['sha256'][:12]}); delete it to "
                                      f"train this stage again on the new latents, or use another --out")
            raise CheckpointError(f"{path} was trained on {'latents (--latent)' if theirs else 'pixels'}, this run "
                                  f"on {'latents (--latent)' if ours else 'pixels'}; {fix}")
    if "lineages" in header:
        if ckpt.get("ranks") != header["ranks"]:
            raise CheckpointError(f"{path} has ranks {'/'.join(ckpt.get('ranks') or ())}, this run "
                                  f"{'/'.join(header['ranks'])}; {fix}")
        ours, theirs = set(map(tuple, header["lineages"])), set(map(tuple, ckpt["lineages"]))
        if ours != theirs:
            def some(lineages):
                return f"{len(lineages)} (e.g. '{'/'.join(n for n in min(lineages, key=str) if n)}')"
            diffs = ([f"lineages only in the data: {some(ours - theirs)}"] if ours - theirs else []) + \
                    ([f"lineages only in the checkpoint: {some(theirs - ours)}"] if theirs - ours else [])
            raise CheckpointError(f"{path} was trained on another taxonomy ({'; '.join(diffs)}); {fix}")
    for k in flags:
        flag, theirs, ours = "--" + k.replace("_", "-"), ckpt["train_config"].get(k), header["train_config"][k]
        if theirs != ours:
            raise CheckpointError(f"{path} was trained with {flag} {theirs}, this run has {flag} {ours}; {fix}")
    for what in ("unet_config", "diffusion_config", "autoencoder_config"):
        for k, v in header.get(what, {}).items():
            if k != "attention_impl" and ckpt[what].get(k) != v:  # the attention path computes the same function
                raise CheckpointError(f"{path} has {what} {k}={ckpt[what].get(k)}, this run {k}={v}; {fix}")
    if resuming and "vocab" in header and "cooldown_steps" not in ckpt:  # a stage's .last.pt keeps its cool-down
        raise CheckpointError(f"{path} was written by another version of train.py (no cooldown_steps); "
                              "delete it to train this stage again")
    if resuming and "vocab" in header and ckpt["vocab"] != header["vocab"]:
        raise CheckpointError(f"{path} numbers the taxa in another order than the data lists them; "
                              "delete it to train this stage again")


def by_name(state, vocab, taxonomy):
    """A model state dict whose rank tables are reordered from the checkpoint's ids to ours.

    A taxon's id is its position in a vocabulary, which follows the order the data
    happened to list the taxa in; its name does not. vocab[r][j] is the name the
    checkpoint gave id j at rank r, so row j of its table moves to our id of that name. A name it lacks (a
    taxon new to train.py --extend) gets a row of zeros: it starts as its parent.
    """
    state = dict(state)
    for r, names in enumerate(vocab):
        theirs = {normalize(name): j for j, name in enumerate(names)}
        rows = [theirs.get(normalize(name), len(names)) for name in taxonomy.vocab[r]]  # len(names): the zero row
        table = state[f"conditioner.embed.{r}.weight"]
        state[f"conditioner.embed.{r}.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])[rows]
    return state
