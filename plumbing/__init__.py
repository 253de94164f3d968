"""
The support folder: what makes the method files safe to run, one module per job. Skip it on a first read.

    checkpoints.py  the checkpoint format: the atomic write, open or refuse in one line, the one checker
    cli.py          command-line value types, the checks of flags that fail together, the shared sampling flags
    randomness.py   generators seeded by (seed, stage, step), so a resumed run draws the same numbers
    torchrun.py     several processes: joining them, DDP, the mean loss, the resumable save
    signals.py      Ctrl-C and SIGTERM: save after the step, then stop
    latent.py       train.py --latent: the autoencoder stage, the latent cache, decoding
    images.py       images in and out: the sampling loop, uint8, grids, the tree figure, PSNR, image folders
    inception.py    FID's Inception network, its weights and the resize modes
    readers.py      real data: folder trees, tables (FishNet, BIOSCAN-1M), iNaturalist, the image cache

The method files (taxonomy.py, unet.py, model.py) import nothing from here; these modules import them.
"""
