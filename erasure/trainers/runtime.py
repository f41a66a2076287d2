"""Lightning Fabric plumbing shared by every trainer: processes, devices, precision, collectives.

Data parallelism is done by hand on purpose. Every rank draws the same GLOBAL batch from a
generator seeded by (seed, step) and keeps its own slice; after ``backward`` the gradients of
the trained tensors are averaged over ranks. That equals a single process on the global batch
(each rank's loss is a mean over an equal slice), and unlike a DDP wrapper it needs no forward
hooks, so frozen no-grad calls through the same UNet, partial sampling and freezing a stopped
concept's coefficients mid-run are all allowed. Fabric launches the processes (``--devices``,
``--num_nodes``, ``--strategy``), places the model and provides autocast and the collectives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from lightning_fabric import Fabric
from torch import nn

from erasure.errors import TrainingSetupError

#: Strategies under which every process holds the whole model (the gradients are averaged here).
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
#: Gradients are all-reduced in flat buckets of at most this many elements.
BUCKET_ELEMENTS = 2**24


@dataclass(frozen=True)
class FabricOptions:
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"


def make_fabric(options: FabricOptions) -> Fabric:
    """A Fabric for ``options``, refusing combinations Fabric would silently change."""
    if options.strategy not in STRATEGIES:
        raise TrainingSetupError(
            f"--strategy {options.strategy!r} is not supported: the trainers keep the whole model on every "
            f"process; use one of {', '.join(STRATEGIES)}."
        )
    if options.precision not in PRECISIONS:
        raise TrainingSetupError(f"--precision {options.precision!r} is not supported; use one of {', '.join(PRECISIONS)}.")
    if options.devices < 1 or options.num_nodes < 1:
        raise TrainingSetupError(f"--devices and --num_nodes must be >= 1, got {options.devices} and {options.num_nodes}.")
    if options.accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise TrainingSetupError(
            f"--accelerator {options.accelerator} was asked for, but CUDA is not available on this machine (torch "
            f"{torch.__version__}); use --accelerator cpu (or auto), or install a CUDA build of torch."
        )
    if options.accelerator in ("cuda", "gpu") and options.devices > torch.cuda.device_count():
        raise TrainingSetupError(
            f"--devices {options.devices} asks for more GPUs than this machine has ({torch.cuda.device_count()}); "
            f"pass --devices {torch.cuda.device_count()} or fewer."
        )
    if options.accelerator == "mps" and not torch.backends.mps.is_available():
        raise TrainingSetupError("--accelerator mps was asked for, but MPS is not available; use --accelerator cpu.")
    on_cpu = options.accelerator == "cpu" or (options.accelerator == "auto" and not torch.cuda.is_available())
    if options.precision == "16-mixed" and on_cpu:
        raise TrainingSetupError(
            "--precision 16-mixed needs CUDA (fp16 autocast does not exist on CPU); use --precision bf16-mixed "
            "or 32-true on CPU."
        )
    return Fabric(
        accelerator=options.accelerator,
        devices=options.devices,
        num_nodes=options.num_nodes,
        strategy=options.strategy,
        precision=options.precision,
    )


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for training step ``step``, identical on every rank and on resume.

    Deriving it from (seed, step) instead of carrying one generator through the run means a
    resumed run draws exactly what the uninterrupted run would have drawn.
    """
    digest = hashlib.sha256(f"erasure-step:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def local_rows(global_batch: int, rank: int, world_size: int) -> slice:
    """This rank's rows of a global batch; the batch must split evenly over the ranks."""
    if global_batch % world_size:
        raise TrainingSetupError(
            f"--batch_size {global_batch} does not split evenly over {world_size} processes; use a multiple of "
            f"{world_size} (devices x nodes)."
        )
    size = global_batch // world_size
    return slice(rank * size, (rank + 1) * size)


def _vector(fabric: Fabric, values: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """Scalars (numbers or 0-d tensors on any device) as one detached float64 vector on Fabric's device."""
    return torch.stack(
        [torch.as_tensor(value).detach().to(device=fabric.device, dtype=torch.float64).reshape(()) for value in values]
    )


def global_mean(fabric: Fabric, values: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """Mean over ranks of a vector of scalars (one collective call)."""
    vector = _vector(fabric, values)
    return vector if fabric.world_size == 1 else fabric.all_reduce(vector, reduce_op="mean")


def global_sum(fabric: Fabric, values: Sequence[float | torch.Tensor]) -> torch.Tensor:
    """Sum over ranks of a vector of scalars (one collective call)."""
    vector = _vector(fabric, values)
    return vector if fabric.world_size == 1 else fabric.all_reduce(vector, reduce_op="sum")


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive gradients of one dtype and device, at most ``BUCKET_ELEMENTS`` per bucket."""
    buckets: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        if current and (
            size + grad.numel() > BUCKET_ELEMENTS or grad.dtype != current[0].dtype or grad.device != current[0].device
        ):
            buckets.append(current)
            current, size = [], 0
        current.append(grad)
        size += grad.numel()
    if current:
        buckets.append(current)
    return buckets


@torch.no_grad()
def average_gradients(fabric: Fabric, parameters: Iterable[nn.Parameter]) -> None:
    """Replace every existing ``.grad`` by its mean over ranks (one all-reduce per flat bucket).

    All ranks must hold gradients for the same parameters, which holds because what is trained
    and what is frozen is decided from rank-independent values.
    """
    if fabric.world_size == 1:
        return
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    for bucket in _buckets(grads):
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        fabric.all_reduce(flat, reduce_op="mean")
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
