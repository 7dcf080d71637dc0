"""Several processes, one device each: torchrun's process group, DDP and the few reductions the engine needs.

Run without torchrun (or with one process) and every function here is a no-op. Under
`torchrun --nproc_per_node N [--nnodes M ...]` each process joins the group that torchrun
describes in its environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL on
CUDA, gloo otherwise. How the work is split and why the numbers are those of the authors'
DataParallel runs is in docs/distributed.md.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def world_size():
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    """This process's index in 0..world_size() - 1."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """Whether this is process 0, the one that writes files and prints progress."""
    return rank() == 0


def error_prefix():
    """'(process R) ' before an error message under torchrun, where any process may report one."""
    return f"(process {rank()}) " if world_size() > 1 else ""


def unusable(device):
    """Why `device` cannot be used on this machine, in one line ("--device cuda is not usable here:
    Found no NVIDIA driver ..."), or None: a device this machine has, not just a well-formed name."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"--device {device} is not usable here: {reason}"
    return None


def cpu_fallback_warning(device):
    """One warning line when CUDA_VISIBLE_DEVICES asks for a GPU (as scripts/*.sh do) but CUDA cannot be
    used, so the default device became the CPU; else None. The reason is CUDA's own first line."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if torch.device(device).type != "cpu" or not visible or torch.cuda.is_available():
        return None
    try:
        torch.empty(0, device="cuda")
        reason = "no usable GPU"
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"warning: CUDA_VISIBLE_DEVICES={visible} is set but CUDA cannot be used here ({reason}); running on the CPU"


def init(device):
    """Join torchrun's process group when it started several processes; returns this process's device.

    On CUDA each process takes its own GPU, cuda:LOCAL_RANK. ValueError (one line) for what cannot
    work: an explicit GPU index, or fewer visible GPUs than processes on this machine.
    """
    device = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if device.index is not None:
            raise ValueError(f"--device {device}: under torchrun each process uses its own GPU, "
                             f"cuda:LOCAL_RANK; pass --device cuda")
        if local >= visible:
            raise ValueError(f"process with LOCAL_RANK {local} has no GPU of its own ({visible} visible); "
                             f"start at most {visible} processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return device


def shutdown():
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session():
    """Leave at the end a process group that `init` joined inside; keep one that a caller set up.

    (A test runs several stages in the same processes: joining the group again after leaving it
    can read the previous group's addresses from torchrun's store.)
    """
    outer = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not outer:
            shutdown()


def wrap(model, find_unused_parameters):
    """`model` in DistributedDataParallel with several processes, else `model` itself.

    DDP averages the gradients over the processes and, before every forward, gives every process
    process 0's buffers (BN running statistics, activation ranges), as DataParallel keeps replica
    0's. `find_unused_parameters` must be true when a step may leave a trainable parameter without
    gradient on some process (the engine's models never do: see Run.__init__).
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def sync_batch_norm(model):
    """--sync-bn: batch-norm statistics over the global batch instead of per process (a departure).

    The processes must call every batch norm alike, backward included. Nothing to do in one process.
    """
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    if device.type != "cuda":  # torch's SyncBatchNorm raises on CPU
        raise ValueError(f"--sync-bn needs CUDA devices, not {device.type}")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _device():
    """Where this backend's collectives want their tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(tensor):
    """The elementwise sum over the processes, as a new tensor (`tensor` itself in one process)."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def global_mean(value, count):
    """(total count, count-weighted mean of a scalar tensor `value`) over the processes.

    In one process (count, value) unchanged; otherwise the sums are taken in float64.
    """
    if world_size() == 1:
        return count, value
    totals = all_sum(torch.stack([value.double() * count, value.new_tensor(count, dtype=torch.float64)]))
    return totals[1], (totals[0] / totals[1]).to(value.dtype)


def any_process(flag):
    """Whether `flag` (a bool or a bool tensor) is true on any process; the same answer everywhere."""
    if world_size() == 1:
        return bool(flag)
    flag = torch.as_tensor(flag).to(_device(), torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def agreed_signal(signum):
    """The signal that any process received (the highest number if several), else None.

    Called by every process at the same step, so that all stop there together.
    """
    if world_size() == 1:
        return signum
    t = torch.tensor(signum or 0, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) or None


def broadcast_buffers(model):
    """Give every process process 0's buffers, as DDP does before each training forward.

    Called before evaluating, because a process's own buffers moved in its last training step.
    """
    if world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def all_gather(obj):
    """Every process's `obj` (picklable), in rank order; [obj] in one process."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    """Wait until every process gets here."""
    if world_size() > 1:
        dist.barrier()
