"""CompVis's config-driven training entry point (``main.py``), for Lightning 2.x.

    python main.py --base configs/latent-diffusion/<config>.yaml -t --gpus 0,
    python main.py -r logs/<timestamp>_<name>            # resume a run

Configs are merged left to right (``--base a.yaml b.yaml``), then ``key.sub=value`` arguments;
their ``model:`` is the LightningModule, ``data:`` the data module (usually
``main.DataModuleFromConfig``) and ``lightning:`` the trainer settings, logger, checkpointing and
callbacks. A run writes ``logs/<timestamp>_<name>/`` as CompVis does: ``configs/`` (the merged
project and lightning configs), ``checkpoints/`` (``last.ckpt`` and ``epoch=NNNNNN.ckpt``), the
logger's files and ``images/`` from ``ImageLogger``. The learning rate is
``base_learning_rate`` times accumulate_grad_batches * GPUs * batch size unless ``--scale_lr False``.

CompVis passed the remaining flags to ``Trainer.add_argparse_args``, which Lightning 2 no longer
has: here every ``pytorch_lightning.Trainer`` argument of a plain type is a ``--flag`` (e.g.
``--max_epochs``, ``--max_steps``, ``--accelerator``, ``--devices``, ``--precision``,
``--accumulate_grad_batches``), and the Lightning 1.x flags ``--gpus`` (``0,`` / ``0,1`` / ``2``) and
``--resume_from_checkpoint`` are mapped onto Lightning 2's ``accelerator``/``devices`` and
``fit(ckpt_path=...)``. The default logger is Lightning's ``CSVLogger`` (CompVis's TestTube logger
no longer exists); a ``lightning.logger`` config picks another.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import inspect
import os
import pdb
import signal
import sys
import time
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning import seed_everything
from pytorch_lightning.callbacks import Callback, LearningRateMonitor  # noqa: F401  (configs name main.LearningRateMonitor)
from pytorch_lightning.trainer import Trainer
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.util import instantiate_from_config

#: Trainer arguments that are objects, not command-line values.
NOT_FLAGS = frozenset({"self", "logger", "callbacks", "plugins", "profiler"})
#: The command-line flags that configure the Trainer (Lightning 2's plain arguments and two 1.x names).
TRAINER_FLAGS = frozenset(set(inspect.signature(Trainer.__init__).parameters) - NOT_FLAGS) | {"gpus", "resume_from_checkpoint"}


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("Boolean value expected.")


def trainer_value(text: str) -> Any:
    """A Trainer flag's value: bool, None, int, float, or else the string (``0,`` stays a string)."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def get_parser(**parser_kwargs: Any) -> argparse.ArgumentParser:
    """CompVis's flags, with its names and defaults."""
    parser = argparse.ArgumentParser(**parser_kwargs)
    parser.add_argument("-n", "--name", type=str, const=True, default="", nargs="?", help="postfix for logdir")
    parser.add_argument("-r", "--resume", type=str, const=True, default="", nargs="?",
                        help="resume from logdir or checkpoint in logdir")
    parser.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=list(),
                        help="paths to base configs. Loaded from left-to-right. Parameters can be overwritten or added "
                             "with command-line options of the form `--key value`.")
    parser.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    parser.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?", help="disable test")
    parser.add_argument("-p", "--project", help="name of new or path to existing project")
    parser.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                        help="enable post-mortem debugging")
    parser.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    parser.add_argument("-f", "--postfix", type=str, default="", help="post-postfix for default name")
    parser.add_argument("-l", "--logdir", type=str, default="logs", help="directory for logging data")
    parser.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                        help="scale base-lr by ngpu * batch_size * n_accumulate")
    return parser


def add_trainer_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every plain ``Trainer`` argument as ``--name VALUE``, plus Lightning 1.x's ``--gpus`` and
    ``--resume_from_checkpoint``. Only flags given on the command line end up in the namespace."""
    group = parser.add_argument_group("pl.Trainer (Lightning 2.x arguments; see its documentation)")
    for name, parameter in inspect.signature(Trainer.__init__).parameters.items():
        if name in TRAINER_FLAGS:
            group.add_argument(f"--{name}", type=trainer_value, default=argparse.SUPPRESS,
                               help=f"default: {parameter.default!r}")
    group.add_argument("--gpus", type=str, default=argparse.SUPPRESS,
                       help="Lightning 1.x style GPU list ('0,' or '0,1') or count; sets accelerator and devices")
    group.add_argument("--resume_from_checkpoint", type=str, default=argparse.SUPPRESS,
                       help="checkpoint to continue training from (Lightning 2: fit(ckpt_path=...))")
    return parser


def gpu_devices(gpus: Any) -> list[int] | int:
    """Lightning 1.x ``gpus``: '0,' -> [0], '0,1' -> [0, 1], 2 -> 2 (a count)."""
    if isinstance(gpus, int):
        return gpus
    text = str(gpus).strip()
    if "," in text:
        return [int(index) for index in text.strip(",").split(",") if index.strip()]
    return int(text)


def trainer_arguments(trainer_config: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Lightning 2 ``Trainer`` keyword arguments from a (Lightning 1.x style) trainer config, and the
    number of GPUs (1 on a CPU) used to scale the learning rate."""
    config = dict(trainer_config)
    config.pop("resume_from_checkpoint", None)
    gpus = config.pop("gpus", None)
    if config.get("accelerator") in ("ddp", "dp", "ddp_spawn"):  # Lightning 1.x put the strategy here
        config["strategy"] = config.pop("accelerator")
    if gpus is not None:
        config["accelerator"] = "gpu"
        config["devices"] = gpu_devices(gpus)
    valid = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"lightning.trainer has {unknown}, which pytorch_lightning.Trainer {pl.__version__} does not "
                         f"take; remove them or use Lightning 2 names (e.g. gpus -> accelerator/devices).")
    ngpu = 1
    if config.get("accelerator") in ("gpu", "cuda"):
        devices = config.get("devices", 1)
        ngpu = len(devices) if isinstance(devices, list) else (torch.cuda.device_count() if devices in (-1, "auto") else int(devices))
        if ngpu > 1:
            config.setdefault("strategy", "ddp")
    return config, ngpu


class WrappedDataset(Dataset):
    """Wraps an arbitrary object with __len__ and __getitem__ into a pytorch dataset"""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(_: int) -> None:
    """Give each data-loader worker its own numpy seed and, for CompVis's iterable datasets (which
    hold ``valid_ids``), its own share of the records."""
    worker_info = torch.utils.data.get_worker_info()
    dataset = worker_info.dataset
    worker_id = worker_info.id
    if isinstance(dataset, IterableDataset) and hasattr(dataset, "valid_ids"):
        split_size = dataset.num_records // worker_info.num_workers
        dataset.sample_ids = dataset.valid_ids[worker_id * split_size:(worker_id + 1) * split_size]
        current_id = np.random.choice(len(np.random.get_state()[1]), 1)
        np.random.seed(int(np.random.get_state()[1][current_id][0]) + worker_id)
    else:
        np.random.seed(int(np.random.get_state()[1][0]) + worker_id)


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test/predict datasets from ``target``/``params`` configs, in DataLoaders."""

    def __init__(self, batch_size: int, train: Any = None, validation: Any = None, test: Any = None,
                 predict: Any = None, wrap: bool = False, num_workers: int | None = None,
                 shuffle_test_loader: bool = False, use_worker_init_fn: bool = False,
                 shuffle_val_dataloader: bool = False) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset_configs: dict[str, Any] = {}
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.use_worker_init_fn = use_worker_init_fn
        self.wrap = wrap
        if train is not None:
            self.dataset_configs["train"] = train
            self.train_dataloader = self._train_dataloader
        if validation is not None:
            self.dataset_configs["validation"] = validation
            self.val_dataloader = partial(self._loader, "validation", shuffle=shuffle_val_dataloader)
        if test is not None:
            self.dataset_configs["test"] = test
            self.test_dataloader = partial(self._loader, "test", shuffle=shuffle_test_loader)
        if predict is not None:
            self.dataset_configs["predict"] = predict
            self.predict_dataloader = partial(self._loader, "predict")

    def prepare_data(self) -> None:
        for data_cfg in self.dataset_configs.values():
            instantiate_from_config(data_cfg)

    def setup(self, stage: str | None = None) -> None:
        self.datasets = {k: instantiate_from_config(cfg) for k, cfg in self.dataset_configs.items()}
        if self.wrap:
            self.datasets = {k: WrappedDataset(dataset) for k, dataset in self.datasets.items()}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        init_fn = worker_init_fn if iterable or self.use_worker_init_fn else None
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          worker_init_fn=init_fn, shuffle=shuffle and not iterable)

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)


class SetupCallback(Callback):
    """Creates the run's folders and saves the merged configs when fitting starts (rank 0); saves
    ``last.ckpt`` when training is interrupted."""

    def __init__(self, resume: str, now: str, logdir: str, ckptdir: str, cfgdir: str, config: DictConfig,
                 lightning_config: DictConfig) -> None:
        super().__init__()
        self.resume, self.now = resume, now
        self.logdir, self.ckptdir, self.cfgdir = logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def on_exception(self, trainer: Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt) and trainer.global_rank == 0:
            print("Summoning checkpoint.")
            trainer.save_checkpoint(os.path.join(self.ckptdir, "last.ckpt"))

    def on_fit_start(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            for folder in (self.logdir, self.ckptdir, self.cfgdir):
                os.makedirs(folder, exist_ok=True)
            if "metrics_over_trainsteps_checkpoint" in self.lightning_config.get("callbacks", {}):
                os.makedirs(os.path.join(self.ckptdir, "trainstep_checkpoints"), exist_ok=True)
            print("Project config")
            print(OmegaConf.to_yaml(self.config))
            OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
            print("Lightning config")
            print(OmegaConf.to_yaml(self.lightning_config))
            OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                           os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))
        elif not self.resume and os.path.exists(self.logdir):
            # ModelCheckpoint created the log directory on this rank too; move it out of the way.
            dst, name = os.path.split(self.logdir)
            dst = os.path.join(dst, "child_runs", name)
            os.makedirs(os.path.split(dst)[0], exist_ok=True)
            try:
                os.rename(self.logdir, dst)
            except FileNotFoundError:
                pass


class ImageLogger(Callback):
    """Saves ``pl_module.log_images(batch)`` grids under ``<logger save_dir>/images/<split>/`` every
    ``batch_frequency`` steps (and at steps 1, 2, 4, ... with ``increase_log_steps``)."""

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.rescale = rescale
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.log_steps = [2**n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps else [self.batch_freq]
        self.clamp = clamp
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_images_kwargs = log_images_kwargs or {}
        self.log_first_step = log_first_step

    @rank_zero_only
    def log_local(self, save_dir: str, split: str, images: dict[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> None:
        root = os.path.join(save_dir, "images", split)
        for k, value in images.items():
            grid = torchvision.utils.make_grid(value, nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0
            grid = (grid.permute(1, 2, 0).squeeze(-1).numpy() * 255).astype(np.uint8)
            path = os.path.join(root, f"{k}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png")
            os.makedirs(os.path.split(path)[0], exist_ok=True)
            Image.fromarray(grid).save(path)

    def log_img(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int, split: str = "train") -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if not (self.check_frequency(check_idx) and callable(getattr(pl_module, "log_images", None))
                and self.max_images > 0):
            return
        is_train = pl_module.training
        if is_train:
            pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        for k in images:
            images[k] = images[k][:min(images[k].shape[0], self.max_images)]
            if isinstance(images[k], torch.Tensor):
                images[k] = images[k].detach().float().cpu()
                if self.clamp:
                    images[k] = torch.clamp(images[k], -1.0, 1.0)
        save_dir = pl_module.logger.save_dir if pl_module.logger is not None else pl_module.trainer.default_root_dir
        self.log_local(save_dir, split, images, pl_module.global_step, pl_module.current_epoch, batch_idx)
        experiment = getattr(pl_module.logger, "experiment", None)
        if callable(getattr(experiment, "add_image", None)):  # TensorBoard-style loggers
            for k, value in images.items():
                grid = (torchvision.utils.make_grid(value) + 1.0) / 2.0
                experiment.add_image(f"{split}/{k}", grid, global_step=pl_module.global_step)
        if is_train:
            pl_module.train()

    def check_frequency(self, check_idx: int) -> bool:
        if ((check_idx % self.batch_freq) == 0 or (check_idx in self.log_steps)) and (check_idx > 0 or self.log_first_step):
            if self.log_steps:
                self.log_steps.pop(0)
            return True
        return False

    def on_train_batch_end(self, trainer: Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.disabled and (pl_module.global_step > 0 or self.log_first_step):
            self.log_img(pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.disabled and pl_module.global_step > 0:
            self.log_img(pl_module, batch, batch_idx, split="val")


class CUDACallback(Callback):
    """Reports each training epoch's time and peak CUDA memory (nothing on a CPU)."""

    def on_train_epoch_start(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
        self.start_time = time.time()
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: pl.LightningModule) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            return
        torch.cuda.synchronize(device)
        max_memory = trainer.strategy.reduce(torch.cuda.max_memory_allocated(device) / 2**20)
        epoch_time = trainer.strategy.reduce(time.time() - self.start_time)
        rank_zero_info(f"Average Epoch time: {float(epoch_time):.2f} seconds")
        rank_zero_info(f"Average Peak memory {float(max_memory):.2f}MiB")


def run_paths(opt: argparse.Namespace, now: str) -> tuple[str, str | None, list[str]]:
    """(logdir, checkpoint to resume, base configs) as CompVis derives them from -r/-n/-b."""
    if opt.name and opt.resume:
        raise ValueError("-n/--name and -r/--resume cannot be specified both. If you want to resume training in a "
                         "new log folder, use -n/--name in combination with --resume_from_checkpoint")
    if opt.resume:
        if not os.path.exists(opt.resume):
            raise ValueError(f"Cannot find {opt.resume}")
        if os.path.isfile(opt.resume):
            logdir = os.path.dirname(os.path.dirname(opt.resume))
            ckpt = opt.resume
        else:
            logdir = opt.resume.rstrip("/")
            ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
        return logdir, ckpt, sorted(glob.glob(os.path.join(logdir, "configs/*.yaml"))) + opt.base
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + os.path.splitext(os.path.split(opt.base[0])[-1])[0]
    else:
        name = ""
    return os.path.join(opt.logdir, now + name + opt.postfix), getattr(opt, "resume_from_checkpoint", None), opt.base


def default_callbacks(opt: argparse.Namespace, now: str, logdir: str, ckptdir: str, cfgdir: str, config: DictConfig,
                      lightning_config: DictConfig, model: Any) -> DictConfig:
    """CompVis's callbacks (setup, images, learning rate, CUDA, checkpoints) merged with ``lightning.callbacks``."""
    checkpoint: dict[str, Any] = {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                                  "params": {"dirpath": ckptdir, "filename": "{epoch:06}", "verbose": True, "save_last": True}}
    if getattr(model, "monitor", None):
        print(f"Monitoring {model.monitor} as checkpoint metric.")
        checkpoint["params"].update(monitor=model.monitor, save_top_k=3)
    checkpoint_cfg = OmegaConf.merge(checkpoint, lightning_config.get("modelcheckpoint", OmegaConf.create()))
    print(f"Merged modelckpt-cfg: \n{checkpoint_cfg}")
    defaults: dict[str, Any] = {
        "setup_callback": {"target": "main.SetupCallback",
                           "params": {"resume": opt.resume, "now": now, "logdir": logdir, "ckptdir": ckptdir,
                                      "cfgdir": cfgdir, "config": config, "lightning_config": lightning_config}},
        "image_logger": {"target": "main.ImageLogger", "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
        "learning_rate_logger": {"target": "main.LearningRateMonitor", "params": {"logging_interval": "step"}},
        "cuda_callback": {"target": "main.CUDACallback"},
        "checkpoint_callback": checkpoint_cfg,
    }
    callbacks_cfg = lightning_config.get("callbacks", OmegaConf.create())
    if "metrics_over_trainsteps_checkpoint" in callbacks_cfg:
        print("Caution: Saving checkpoints every n train steps without deleting. This might require some free space.")
        defaults["metrics_over_trainsteps_checkpoint"] = {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": {"dirpath": os.path.join(ckptdir, "trainstep_checkpoints"), "filename": "{epoch:06}-{step:09}",
                       "verbose": True, "save_top_k": -1, "every_n_train_steps": 10000, "save_weights_only": True}}
    merged = OmegaConf.merge(defaults, callbacks_cfg)
    if "ignore_keys_callback" in merged:
        if opt.resume_ckpt:
            merged.ignore_keys_callback.params["ckpt_path"] = opt.resume_ckpt
        else:
            del merged["ignore_keys_callback"]
    return merged


def main() -> None:
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    sys.path.append(os.getcwd())  # `main.DataModuleFromConfig` etc. resolve when run as `python main.py`
    parser = add_trainer_flags(get_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    opt, unknown = parser.parse_known_args()
    logdir, opt.resume_ckpt, opt.base = run_paths(opt, now)
    ckptdir, cfgdir = os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs")
    seed_everything(opt.seed)
    trainer: Trainer | None = None
    try:
        config = OmegaConf.merge(*[OmegaConf.load(cfg) for cfg in opt.base], OmegaConf.from_dotlist(unknown))
        lightning_config = config.pop("lightning", OmegaConf.create())
        trainer_config = lightning_config.get("trainer", OmegaConf.create())
        for key in TRAINER_FLAGS & set(vars(opt)):  # only the flags given on the command line are in opt
            trainer_config[key] = getattr(opt, key)
        lightning_config.trainer = trainer_config
        trainer_kwargs, ngpu = trainer_arguments(OmegaConf.to_container(trainer_config, resolve=True))
        if trainer_kwargs.get("accelerator") in ("gpu", "cuda"):
            print(f"Running on GPUs {trainer_kwargs.get('devices', 1)}")

        model = instantiate_from_config(config.model)
        logger_cfg = OmegaConf.merge({"target": "pytorch_lightning.loggers.CSVLogger",
                                      "params": {"name": "csv", "save_dir": logdir}},
                                     lightning_config.get("logger", OmegaConf.create()))
        logger = instantiate_from_config(logger_cfg)
        callbacks_cfg = default_callbacks(opt, now, logdir, ckptdir, cfgdir, config, lightning_config, model)
        trainer = Trainer(logger=logger, callbacks=[instantiate_from_config(callbacks_cfg[k]) for k in callbacks_cfg],
                          **trainer_kwargs)
        trainer.logdir = logdir

        data = instantiate_from_config(config.data)
        data.prepare_data()
        data.setup()
        print("#### Data #####")
        for k in data.datasets:
            print(f"{k}, {data.datasets[k].__class__.__name__}, {len(data.datasets[k])}")

        bs, base_lr = config.data.params.batch_size, config.model.base_learning_rate
        accumulate_grad_batches = trainer_kwargs.get("accumulate_grad_batches", 1)
        print(f"accumulate_grad_batches = {accumulate_grad_batches}")
        lightning_config.trainer.accumulate_grad_batches = accumulate_grad_batches
        if opt.scale_lr:
            model.learning_rate = accumulate_grad_batches * ngpu * bs * base_lr
            print(f"Setting learning rate to {model.learning_rate:.2e} = {accumulate_grad_batches} "
                  f"(accumulate_grad_batches) * {ngpu} (num_gpus) * {bs} (batchsize) * {base_lr:.2e} (base_lr)")
        else:
            model.learning_rate = base_lr
            print("++++ NOT USING LR SCALING ++++")
            print(f"Setting learning rate to {model.learning_rate:.2e}")

        def melk(*args: Any) -> None:
            """Save last.ckpt now (SIGUSR1, or a crash during fit)."""
            if trainer.global_rank == 0:
                print("Summoning checkpoint.")
                trainer.save_checkpoint(os.path.join(ckptdir, "last.ckpt"))

        def divein(*args: Any) -> None:
            """Drop into pdb (SIGUSR2; CompVis used pudb, which is not a dependency here)."""
            if trainer.global_rank == 0:
                pdb.set_trace()

        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, melk)
            signal.signal(signal.SIGUSR2, divein)

        if opt.train:
            try:
                trainer.fit(model, data, ckpt_path=opt.resume_ckpt)
            except Exception:
                melk()
                raise
        if not opt.no_test and not trainer.interrupted:
            if "test" in data.dataset_configs:
                trainer.test(model, data)
            else:
                print("No `test` data in the config: skipping the test (pass --no-test to silence this).")
    except Exception:
        if opt.debug and (trainer is None or trainer.global_rank == 0):
            pdb.post_mortem()
        raise
    finally:
        if opt.debug and not opt.resume and (trainer is None or trainer.global_rank == 0) and os.path.isdir(logdir):
            dst = os.path.join(os.path.dirname(logdir), "debug_runs", os.path.basename(logdir))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.rename(logdir, dst)
        if trainer is not None and trainer.global_rank == 0 and trainer.profiler.summary():
            print(trainer.profiler.summary())


if __name__ == "__main__":
    main()
