"""
The command line: the parser every script builds, the type function of every flag (each turns the text after a
flag into a value or raises ArgumentTypeError saying what is allowed; argparse then ends with one line, exit
status 2), the dataclass-to-flags parser of train.py, the checks of flags that only fail together, and the
sampling flags sample.py and fid.py share:

    train.py: error: argument --batch-size: must be a positive integer (got 0) (see --help)
"""
import argparse
import math
import os
import tempfile
from dataclasses import field, fields

import torch
from PIL import Image

from model import DiffusionConfig
from taxonomy import RANKS, held_out, species_counts
from unet import SIZES, UNetConfig


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad value ends in its one error line alone: the usage, which runs to 20 lines
    for train.py, would bury it (--help still shows everything)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def script_parser(doc):
    """The parser of a script whose docstring is its --help description (kept as written: it holds commands)."""
    return ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def flag(default, help, check=str):
    """A dataclass field that is also a command-line flag: its default, its help, and what it takes (a type
    function below, or a tuple of choices). config_parser reads them back."""
    return field(default=default, metadata={"help": help, "check": check})


def config_parser(config, doc):
    """A parser with a flag for every field of the dataclass `config` (--batch-size for batch_size), made by
    flag(); a bool field is a switch."""
    parser = script_parser(doc)
    for f in fields(config):
        name, help, check = "--" + f.name.replace("_", "-"), f.metadata["help"].replace("%", "%%"), f.metadata["check"]
        if f.type is bool:
            parser.add_argument(name, action="store_true", help=help)
            continue
        default = " (default: %(default)s)" if f.default != "" else ""
        parser.add_argument(name, default=f.default, help=help + default,
                            type=str if isinstance(check, tuple) else check,
                            choices=check if isinstance(check, tuple) else None)
    return parser


MAX_INT = 2 ** 31 - 1  # the largest count or seed taken: every library it is handed to holds it


def _integer(text, low, what):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what} (got '{text}')") from None
    if not low <= n <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be {what}{f' up to {MAX_INT}' if n > MAX_INT else ''} (got {n})")
    return n


def positive_int(text):
    """1, 2, ...: a batch size, a number of steps or images."""
    return _integer(text, 1, "a positive integer")


def sampling_steps(text):
    """1 .. T: a sampler's network calls, one per timestep of the T the model was trained on (more would reach
    below t = 0, where the log-SNR spacing indexes alpha_bar from its end)."""
    n = positive_int(text)
    if n > DiffusionConfig.timesteps:
        raise argparse.ArgumentTypeError(f"must be at most T = {DiffusionConfig.timesteps} (got {n})")
    return n


def nonneg_int(text):
    """0, 1, 2, ...: a seed, or a count where 0 means none (or the default)."""
    return _integer(text, 0, "a non-negative integer")


def per_species(text):
    """--per-species: a count of images, or a long-tailed tree (taxonomy.species_counts)."""
    try:
        if min(species_counts(text)) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive count (64), pairs:RICH/RARE (pairs:64/4) or "
                                         f"zipf:MAX (zipf:64), all at least 1 (got '{text}')") from None
    return text


def positive_int_list(text):
    """Comma-separated positive integers such as '200,200,600', kept as the text (train.py stores it so)."""
    try:
        [positive_int(n) for n in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, e.g. 200,200,600 "
                                         f"(got '{text}')") from None
    return text


def _number(text, ok, what):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what} (got '{text}')") from None
    if not (math.isfinite(x) and ok(x)):  # nan and inf fail here
        raise argparse.ArgumentTypeError(f"must be {what} (got {text})")
    return x


def finite_float(text):
    """Any number but nan and inf: a guidance scale."""
    return _number(text, lambda x: True, "a finite number")


def positive_float(text):
    """A number > 0: a learning rate, a gradient-norm limit."""
    return _number(text, lambda x: x > 0, "a positive number")


def fraction(text):
    """A number from 0 to 1: a probability, a decay, a share of the steps."""
    return _number(text, lambda x: 0 <= x <= 1, "a number from 0 to 1")


def noise_interval(text):
    """'LO,HI': the noise levels sigma in [LO, HI] where guidance applies (model.guided_eps_fn); '' = every step."""
    if text in ("", None):
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
        if not 0 <= lo <= hi:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LO,HI with 0 <= LO <= HI, e.g. 0.28,5.42 (got '{text}')") from None
    return lo, hi


def input_path(text):
    """A file or folder that exists; '' is the flag left unset."""
    if text and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"must be an existing file or folder (got '{text}': not found)")
    return text


def image_path(text):
    """An image file that can be written, in a format PIL saves (by its extension: .png, .jpg, ...)."""
    text = output_path(text)
    ext = os.path.splitext(text)[1].lower()
    if os.path.isdir(text) or Image.registered_extensions().get(ext) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"must be an image file name such as out/samples.png (got '{text}')")
    return text


def output_path(text):
    """A file or folder that can be written: it, or the nearest folder above it that exists, is writable."""
    up = os.path.abspath(text)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not text:
        why = "empty"
    elif up != os.path.abspath(text) and not os.path.isdir(up):
        why = f"{up} is a file"
    elif not os.access(up, os.W_OK):
        why = f"{up} is not writable"
    else:
        return text
    raise argparse.ArgumentTypeError(f"must be a path that can be written (got '{text}': {why})")


def device_name(text):
    """cpu, or cuda / cuda:N where that GPU is visible."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N (got '{text}')")
    n = torch.cuda.device_count()
    if dev.type == "cuda" and (dev.index or 0) >= n:
        raise argparse.ArgumentTypeError(f"must be cpu{f' or cuda:0 to cuda:{n - 1}' if n else ': no GPU is visible'} "
                                         f"(got '{text}')")
    return text


def downsampling_factor(text):
    """2, 4 or 8: how much the autoencoder shrinks an image's side (unet.AutoencoderConfig.f)."""
    if text not in ("2", "4", "8"):
        raise argparse.ArgumentTypeError(f"must be 2, 4 or 8 (got '{text}')")
    return int(text)


def check_flag_pairs(cfg, error):
    """train.py's values that only fail together: each pair ends in argparse's one line, error(message)."""
    if cfg.latent:  # the UNet halves the latent, which is the image divided by f
        if cfg.image_size % (cfg.latent_f * size_multiple(cfg.size)):
            error(f"argument --image-size: must be a multiple of {cfg.latent_f * size_multiple(cfg.size)} for "
                  f"--latent-f {cfg.latent_f} and --size {cfg.size} (got {cfg.image_size})")
        if cfg.ae_crop % cfg.latent_f:  # a crop is a whole number of latent positions
            error(f"argument --ae-crop: must be a multiple of --latent-f {cfg.latent_f} (got {cfg.ae_crop})")
    elif cfg.image_size % size_multiple(cfg.size):  # the UNet halves the image, then doubles it back
        error(f"argument --image-size: must be a multiple of {size_multiple(cfg.size)} for --size {cfg.size} "
              f"(got {cfg.image_size})")
    if RANKS.index(cfg.level) < RANKS.index(cfg.first_level):
        error(f"argument --level: must not be coarser than --first-level {cfg.first_level} (got {cfg.level})")
    if cfg.hold_out and cfg.data != "toy":
        error(f"argument --hold-out: leaves species of the toy tree out, and --data is {cfg.data}")
    try:
        held_out(cfg.hold_out)
    except ValueError as e:
        error(f"argument {e}")
    if cfg.p_uncond + cfg.p_cut > 1:
        error(f"argument --p-cut: must be at most {1 - cfg.p_uncond:g} beside --p-uncond {cfg.p_uncond:g}, "
              f"as both are shares of one random draw (got {cfg.p_cut:g})")


def size_multiple(size):
    """The UNet of named size `size` halves the image len(channel_mults) - 1 times (unet.UNet): image sides
    must be multiples of 2 to that power, or the way up does not meet the way down."""
    return 2 ** (len(UNetConfig(**SIZES[size]).channel_mults) - 1)


def check_run(cfg, world):
    """Fail before any training: an --out that cannot be written, --amp on a CPU, a batch that does not split."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {cfg.out}: {e.strerror}")
    if cfg.amp and not cfg.device.startswith("cuda"):
        raise SystemExit(f"error: --amp is bf16 autocast for CUDA, and this run is on {cfg.device}, "
                         "where bf16 is many times slower than fp32; drop --amp")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} does not split evenly over {world} processes")
    if cfg.latent and cfg.ae_batch_size % world:
        raise SystemExit(f"error: --ae-batch-size {cfg.ae_batch_size} does not split evenly over {world} processes")


SAMPLERS = ("dpm++", "ddim", "ddpm")
GUIDE_FROM = ("null", "parent", "root")


def add_sampling_flags(p, guidance_help="guidance scale s; 1 = no guidance", nargs=None):
    """The flags sample.py and fid.py share: how to sample, guide and seed, and where."""
    p.add_argument("--steps", type=sampling_steps, default=15, help="sampling steps (network calls per guidance branch)")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm++",
                   help="dpm++: DPM-Solver++(2M), second order (15 steps score as DDIM's 50); ddim; ddpm")
    p.add_argument("--guidance", type=finite_float, nargs=nargs, default=[1.0, 3.0] if nargs else 3.0,
                   help=guidance_help)
    p.add_argument("--guide-from", choices=GUIDE_FROM, default="null",
                   help="negative branch: null = vanilla CFG, parent = one rank up, root = first stage (TaxaGuide)")
    p.add_argument("--guidance-interval", type=noise_interval, default=None, metavar="LO,HI",
                   help="guide only where the noise level sigma_t is in [LO, HI] (default: every step)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the noise: a seed gives the same pictures")
    p.add_argument("--ckpt", type=input_path, default=None, help="default: the finest stage checkpoint in out/")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run: cpu, cuda or cuda:N")
