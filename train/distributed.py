"""Data-parallel training on PyTorch's own stack: ``torchrun --nproc_per_node N -m train.nft`` (or any loop).

* :class:`DistConfig`: the ``--dist.*`` options (strategy ``ddp`` or ``fsdp``, collective timeout).
* :class:`Dist`: the process group seen by a loop (``world == 1`` without torchrun: every collective is a
  no-op, so the single-process path is the same code).  Metrics are reduced across ranks and written once, by
  rank 0.
* :class:`IterationPlan`: the group-aware sampler.  Every rank draws the iteration's prompts, the per-image
  seeds and the training order from the same generators, seeded by ``(seed, iteration)`` alone; the ``K``
  images of a prompt may land on different ranks.  Rank ``r`` rolls out, per optimizer step, its ``1/W`` share
  of that step's samples, so every rank does the same work; rewards are all-gathered so advantages are
  computed over whole groups, then each rank keeps its slice.
* :meth:`IterationPlan.steps`: the micro-batches of every optimizer step.  A step's sample set is a fixed
  chunk of the global training order (``batch_size * grad_accum * world`` samples; train.nft: the iteration's
  samples / ``--train.steps-per-iter``, whatever the world size), so one process with
  ``grad_accum * world`` accumulation steps trains on exactly the same sets as ``world`` processes: the runs
  are equivalent up to float reduction order.  Micro-batch losses are weighted so that a step's gradient is
  the mean over the step's samples whatever their split across ranks.

Randomness never depends on the rank or the world size: rollout noise, training timesteps and training noise
are keyed by the *global* sample index, so a run resumes exactly on the same world size and continues on a
different one (only the float reduction order changes).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass, field

import torch

from .config import ConfigError

__all__ = ["DistConfig", "Dist", "IterationPlan", "MicroBatch", "DistributedError", "wrap_policy"]

# How each logged metric combines across ranks (everything else: the mean).
MAX_METRICS = ("ratio/first_abs_dev", "ratio/max_abs_dev")
SUM_METRICS = ("ratio/first_count", "train/trained_samples")


class DistributedError(RuntimeError):
    """A collective failed: another rank died, or did not answer within ``--dist.timeout-s``."""


_COMM_FAILURE = ("gloo", "nccl", "connection closed", "timed out", "timeout", "socket", "peer")


def as_distributed_error(e: BaseException, rank: int, world: int) -> DistributedError | None:
    """A communication failure raised outside our own collectives (DDP's gradient all-reduce inside
    ``backward``, FSDP's all-gathers) as a :class:`DistributedError`; ``None`` for anything else."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())) or any(k in str(e).lower() for k in _COMM_FAILURE):
        return comm_failure(e, rank, world, "a collective")
    return None


def comm_failure(e: BaseException, rank: int, world: int, what: str) -> DistributedError:
    """The one message every rank prints when communication fails."""
    msg = str(e).strip()
    first = msg.splitlines()[0][:300] if msg else ""
    return DistributedError(
        f"rank {rank}/{world}: {what} failed, another rank probably died or stopped answering within "
        f"--dist.timeout-s ({type(e).__name__}: {first})"
    )


@dataclass
class DistConfig:
    strategy: str = field(
        default="ddp",
        metadata={
            "help": "under torchrun: ddp (DistributedDataParallel) or fsdp (FSDP2 fully_shard, train.nft)"
        },
    )
    timeout_s: float = field(
        default=600.0, metadata={"help": "seconds a collective may wait before a dead rank ends the job"}
    )
    fsdp_param_dtype: str = field(
        default="none",
        metadata={"help": "FSDP2 mixed precision: compute dtype of parameters (none, bfloat16)"},
    )
    fsdp_reshard: bool = field(
        default=True, metadata={"help": "FSDP2: free the gathered parameters after each block's forward"}
    )


def launched_world_size() -> int:
    """The world size torchrun (or any launcher setting ``WORLD_SIZE``) asked for; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_divides(n: int, world: int) -> None:
    """The group-aware sampler splits every iteration's ``n`` images evenly over ``world`` ranks."""
    if n % world:
        raise ConfigError(
            f"WORLD_SIZE: expected a divisor of the global batch (--sample.prompts-per-iter x "
            f"--sample.images-per-prompt = {n} images), got {world} processes"
        )


def validate_dist(dc: DistConfig, *, algo: str) -> None:
    if dc.strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"--dist.strategy: expected ddp or fsdp, got {dc.strategy!r}")
    if dc.strategy == "fsdp" and algo != "nft":
        raise ConfigError(
            f"--dist.strategy: fsdp is supported by train.nft; train.{algo} expected ddp, got 'fsdp'"
        )
    if not dc.timeout_s > 0:
        raise ConfigError(f"--dist.timeout-s: expected a value > 0, got {dc.timeout_s}")
    if dc.fsdp_param_dtype not in ("none", "bfloat16", "float16"):
        raise ConfigError(
            f"--dist.fsdp-param-dtype: expected none, bfloat16 or float16, got {dc.fsdp_param_dtype!r}"
        )


class Dist:
    """The process group of a run.  ``Dist()`` is the single process; :meth:`from_env` joins torchrun's."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, strategy: str = "ddp"):
        self.rank, self.world, self.local_rank, self.strategy = rank, world, local_rank, strategy
        self.ddp = None  # the DistributedDataParallel wrapper (strategy ddp, world > 1)
        self.fsdp_root = None  # the fully_shard-ed transformer (strategy fsdp)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, dc: DistConfig, device_pref: str = "auto") -> Dist:
        """Join the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``,
        ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); NCCL on CUDA, gloo on CPU; every collective times
        out after ``dc.timeout_s`` so that a dead rank ends the job instead of hanging it."""
        world = launched_world_size()
        if world <= 1 and dc.strategy != "fsdp":
            return cls(strategy=dc.strategy)
        import torch.distributed as dist

        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
            # a failed or timed-out NCCL collective aborts the communicator and raises (no silent hang)
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if not dist.is_initialized():
            if world <= 1:  # FSDP on one process still needs a (trivial) process group
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
                os.environ.setdefault("RANK", "0")
                os.environ.setdefault("WORLD_SIZE", "1")
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=datetime.timedelta(seconds=dc.timeout_s),
                device_id=torch.device("cuda", local_rank) if use_cuda else None,
            )
        return cls(rank=rank, world=max(world, 1), local_rank=local_rank, strategy=dc.strategy)

    def device(self, pref: str) -> torch.device:
        if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank) if self.enabled else torch.device("cuda")

    def close(self) -> None:
        """Drop the DDP / FSDP wrappers, then destroy the process group.  The order matters: a DDP reducer
        that outlives ``destroy_process_group`` holds the last reference to the gloo process group, and its
        destructor then waits for the group's worker threads while holding the GIL; a worker that is
        releasing a finished collective's tensor needs the GIL, and the rank hangs at exit (seen once in
        about ten two-process runs; pytorch/pytorch#56297)."""
        import gc

        import torch.distributed as dist

        self.ddp = self.fsdp_root = None
        gc.collect()
        if dist.is_available() and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    # --- collectives (no-ops for one process) -------------------------------------------------------------
    @contextlib.contextmanager
    def _collective(self, what: str):
        try:
            yield
        except (RuntimeError, OSError) as e:  # DistBackendError, gloo's connection errors, timeouts
            raise comm_failure(e, self.rank, self.world, what) from e

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Equal-shaped ``t`` from every rank -> ``[world, *t.shape]`` in rank order (on ``t``'s device)."""
        if not self.enabled:
            return t.unsqueeze(0)
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        with self._collective("all_gather"):
            dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        with self._collective("all_gather_object"):
            dist.all_gather_object(out, obj)
        return out

    def all_reduce_mean(self, tensors: list) -> list:
        """Same-dtype tensors averaged over ranks, in place (one SUM all-reduce of their concatenation, then
        ``/ world``); returned."""
        if not self.enabled or not tensors:
            return tensors
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        with self._collective("all_reduce"):
            dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return tensors

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on at least one (stop requests, Ctrl-C)."""
        if not self.enabled:
            return bool(flag)
        return any(self.all_gather_object(bool(flag)))

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            with self._collective("barrier"):
                dist.barrier()

    def reduce_metrics(self, vals: dict) -> dict:
        """Combine one iteration's metrics across ranks: max for :data:`MAX_METRICS`, sum for
        :data:`SUM_METRICS`, mean for the rest (values computed from all-gathered rewards are equal on every
        rank, so their mean is the value itself).  Non-numeric values are rank 0's."""
        if not self.enabled:
            return vals
        num = {}
        for k, v in vals.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                num[k] = float(v.detach().float().item())
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                num[k] = float(v)
        allv = self.all_gather_object(num)
        keys = set(allv[0])
        if any(set(a) != keys for a in allv):
            raise DistributedError(f"metrics: ranks logged different keys: {[sorted(a) for a in allv]}")
        out = dict(vals)
        for k in keys:
            xs = [a[k] for a in allv]
            if k in MAX_METRICS:
                out[k] = max(xs) if not any(math.isnan(x) for x in xs) else float("nan")
            elif k in SUM_METRICS:
                out[k] = sum(xs)
            else:
                out[k] = sum(xs) / len(xs)
        return out

    # --- gradient synchronisation -----------------------------------------------------------------------
    @contextlib.contextmanager
    def grad_sync(self, enabled: bool):
        """Inside the block, the backward reduces gradients across ranks only when ``enabled``: all
        micro-steps of an accumulation but the last run without communication (DDP ``no_sync``; FSDP2
        ``set_requires_gradient_sync``).  The forward must run inside the block too (DDP decides there)."""
        if self.ddp is not None and not enabled:
            with self.ddp.no_sync():
                yield
        elif self.fsdp_root is not None:
            self.fsdp_root.set_requires_gradient_sync(enabled)
            try:
                yield
            finally:
                self.fsdp_root.set_requires_gradient_sync(True)
        else:
            yield


# ------------------------------------------------------------------------------------------------------------
# The group-aware sampler
# ------------------------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """``rows``: positions in this rank's local arrays; ``gidx``: their global sample indices; ``weight``: the
    factor of this micro-batch's mean loss (``len / step_size * world``); ``dummy``: weight 0, run only so
    that every rank performs the same collectives."""

    rows: torch.Tensor
    gidx: torch.Tensor
    weight: float
    dummy: bool = False


@dataclass
class IterationPlan:
    """One iteration's global batch and this rank's share of it (see the module docstring)."""

    prompts: list  # per image, global order (prompt-major: K images of prompt p at [pK, (p+1)K))
    group_ids: torch.Tensor  # [n]
    seeds: list  # [n] per-image rollout seeds
    order: torch.Tensor  # [n] the global training order
    owned: list  # per rank: global indices in the order that rank rolls out and trains them
    rank: int
    world: int
    per_rank_step: int  # samples per optimizer step per rank (Trainer.per_rank_step)

    @classmethod
    def build(
        cls, prompts, group_ids, seeds, *, order: torch.Tensor, per_rank_step: int, rank: int, world: int
    ) -> IterationPlan:
        n = len(prompts)
        check_world_divides(n, world)
        step = per_rank_step * world
        owned = [[] for _ in range(world)]
        for lo in range(0, n, step):
            chunk = order[lo : lo + step]
            share = len(chunk) // world  # a final partial chunk is still a multiple of world
            for r in range(world):
                owned[r].append(chunk[r * share : (r + 1) * share])
        owned = [torch.cat(o) for o in owned]
        return cls(list(prompts), group_ids, list(seeds), order, owned, rank, world, per_rank_step)

    @property
    def local(self) -> torch.Tensor:
        """This rank's global sample indices, in rollout order (its local arrays follow this order)."""
        return self.owned[self.rank]

    def local_prompts(self) -> list:
        return [self.prompts[i] for i in self.local.tolist()]

    def local_seeds(self) -> list:
        return [self.seeds[i] for i in self.local.tolist()]

    def to_global(self, gathered: torch.Tensor) -> torch.Tensor:
        """``[world, L, ...]`` (every rank's local array, from :meth:`Dist.all_gather`) -> ``[n, ...]``."""
        n = len(self.prompts)
        out = gathered.new_empty((n, *gathered.shape[2:]))
        for r in range(self.world):
            out[self.owned[r].to(out.device)] = gathered[r]
        return out

    def steps(
        self, micro: int, *, trainable: torch.Tensor | None = None, order: torch.Tensor | None = None
    ) -> list[list[MicroBatch]]:
        """The optimizer steps of one pass over the samples, each a list of this rank's micro-batches (at most
        ``micro`` samples each).  A step's set is a chunk of ``per_rank_step * world`` samples of ``order``
        (default: the plan's) restricted to ``trainable`` (bool ``[n]``, default all); steps with no trainable
        sample are skipped on every rank.  Every rank gets the same number of micro-batches per step (padded
        with weight-0 dummies), so collectives line up."""
        n = len(self.prompts)
        order = self.order if order is None else order
        trainable = torch.ones(n, dtype=torch.bool) if trainable is None else trainable.bool().cpu()
        owner = torch.empty(n, dtype=torch.long)
        pos = torch.empty(n, dtype=torch.long)
        for r in range(self.world):
            owner[self.owned[r]] = r
            pos[self.owned[r]] = torch.arange(len(self.owned[r]))
        step = self.per_rank_step * self.world
        plan = []
        for lo in range(0, n, step):
            members = order[lo : lo + step]
            members = members[trainable[members]]
            if members.numel() == 0:
                continue
            per_rank = [members[owner[members] == r] for r in range(self.world)]
            count = max(math.ceil(len(m) / micro) for m in per_rank)
            mine = per_rank[self.rank]
            mbs = []
            for k in range(count):
                g = mine[k * micro : (k + 1) * micro]
                if g.numel():
                    mbs.append(MicroBatch(pos[g], g, len(g) / len(members) * self.world))
                else:  # nothing left here this step: a weight-0 pass keeps the collectives in step
                    g0 = self.local[:1]
                    mbs.append(MicroBatch(pos[g0], g0, 0.0, dummy=True))
            plan.append(mbs)
        return plan


# ------------------------------------------------------------------------------------------------------------
# Wrapping the policy
# ------------------------------------------------------------------------------------------------------------
def _blocks(transformer) -> list:
    blocks = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(transformer, name, None) or [])
    return blocks


def wrap_policy(policy, dist_: Dist, dc: DistConfig) -> None:
    """DDP: the gradient-carrying denoiser becomes ``DistributedDataParallel`` (LoRA ``default`` parameters
    only; frozen weights and the ``old`` adapter never communicate), no-grad forwards (rollouts, ``v_old``,
    ``v_ref``, evaluation) bypass the wrapper.  FSDP2: every transformer block, then the root, is
    ``fully_shard``-ed (parameters sharded as DTensors, optional mixed-precision policy); CUDA graphs are
    turned off (a captured graph cannot replay FSDP's collectives)."""
    if dc.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        tr = policy.transformer
        blocks = _blocks(tr)
        if not blocks:
            raise ConfigError(
                f"--dist.strategy: fsdp expected an SD3/FLUX transformer with transformer blocks, "
                f"got {type(tr).__name__}"
            )
        pdt = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[dc.fsdp_param_dtype]
        mp = MixedPrecisionPolicy(param_dtype=pdt, reduce_dtype=torch.float32 if pdt else None)
        for b in blocks:
            fully_shard(b, mp_policy=mp, reshard_after_forward=dc.fsdp_reshard)
        fully_shard(tr, mp_policy=mp, reshard_after_forward=dc.fsdp_reshard)
        dist_.fsdp_root = tr
        os.environ["NFT_CUDA_GRAPHS"] = "0"
        policy.refresh_parameters()
        return
    if not dist_.enabled:
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(policy.denoiser, broadcast_buffers=False)
    dist_.ddp = ddp
    policy.train_denoiser = ddp
