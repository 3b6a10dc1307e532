"""wandb that never prompts and never stops training: online with a key, else offline run files, or disabled."""
import dataclasses
import os
import warnings


def wandb_key_configured():
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested):
    """'auto' -> online when a wandb key is configured, else offline run files. Never prompts."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if wandb_key_configured():
        return "online"
    print("wandb: no API key configured, logging offline to run files (`wandb sync` uploads them later).")
    return "offline"


class WandbLogger:
    """wandb that never stops training: any failure disables it with a one-line warning."""

    def __init__(self, cfg, run_id):
        self.run = None
        mode = wandb_mode(cfg.wandb)
        if mode == "disabled":
            return
        try:
            import wandb

            if mode == "online" and not wandb_key_configured():
                print("wandb: --wandb online but no API key is configured; logging offline instead.")
                mode = "offline"
            self.wandb = wandb
            # the run id continues the same run on a resume; `resume` only means something to the wandb server
            # (offline, wandb 0.28 prints "`resume` will be ignored" at every start)
            resume = {"resume": "allow"} if mode == "online" else {}
            self.run = wandb.init(
                project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.save_folder, mode=mode,
                id=run_id, settings=wandb.Settings(silent=True, console="off"), **resume,
            )
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._disable(error)

    def _disable(self, error):
        warnings.warn(f"wandb failed ({type(error).__name__}: {error}); training goes on without wandb.")
        self.run = None

    def log(self, data, step):
        if self.run is None:
            return
        try:
            data = {k: self.wandb.Image(v) if isinstance(v, str) and v.endswith(".png") else v for k, v in data.items()}
            self.run.log(data, step=step)
        except Exception as error:  # noqa: BLE001
            self._disable(error)

    def finish(self):
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:  # noqa: BLE001
                self._disable(error)
