"""The homework kit's machinery, below trainer.py and utils.py (students never need to open it).

Each module has one job and imports only from the modules listed before it here (and from diffusion.py / unet.py):

    errors       the errors a user is shown (ConfigError, TrainingDiverged, FIDSetupError)
    files        atomic writes, folder checks, leftovers of killed writes
    device       device choice, seeding, RNG isolation, mixed precision, DistributedDataParallel set-up
    data         image listing and decoding, augmentation on the device, batch order, generated smoke data
    checkpoints  reading and writing checkpoint.pt
    logger       wandb that never stops training
    figures      sample grids, loss / FID curves, metrics.csv, forward and backward diffusion figures
    fid          FID with clean-fid's features, fed from memory
    interrupts   Ctrl-C (and SIGTERM) finish the step, then save
"""
