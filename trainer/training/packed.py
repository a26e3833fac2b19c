"""Packing: several runs of one architecture trained together on one device, sharing each batch.

The models are small, so one model leaves a GPU mostly idle and most of a step is overhead. A pack holds K models
of identical shape (the runs of a search that differ only in optimiser settings, stopping rule and seed, see
`trainer.pack_rule`) and trains them as one: their parameters and buffers are stacked along a new first axis
and one vectorised forward pass (`torch.func.vmap` over `functional_call`) computes all K outputs from each shared
batch. Under vmap the first convolution, which every member applies to the same input, becomes one convolution
with K times the output channels; later layers become grouped convolutions and batched matrix products.

Each member keeps its own `Trainer`: its own initial weights, Adam optimizer (lr, l2), l1 penalty, schedule, early
stopping, checkpoints and reporter (its MLflow child run). A member's parameters are views of the stacked tensors,
so its optimizer steps them in place and its state_dict is always current. A member that stops (early stopping, its
n_epochs, a diverged loss) leaves the pack, which is restacked from the members still training.

What members share: the batch order (the first member's shuffle generator) and the random stream of the noise
layers. Up to those, a member's metrics equal those of the same run trained alone, within float rounding (a fused
convolution sums in another order; tests/test_packed.py compares in float64 over epochs and one step at a time in
fp32 and bf16). With noise on, the shared noise stream makes a packed run differ from its solo run as much as a solo
run with other noise draws does (benchmarks/PACK_VS_SOLO.md).

Autocast does not reach convolutions under vmap, so a bf16 pack casts conv and linear weights and inputs itself.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from trainer.data.windows import WindowSet
from trainer.errors import ConfigError
from trainer.pack_rule import pack_conflict
from trainer.training.trainer import (
    FitResult,
    Trainer,
    TrainingDiverged,
    full_precision,
    l1_penalty,
    score_batch,
    tf32,
)


class StackedModels:
    """K models of one architecture as one vectorised model, their tensors stacked along a new first axis."""

    def __init__(self, models: list[nn.Module]):
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
        for i, s in enumerate(shapes[1:], 1):
            if s != shapes[0] or type(models[i]) is not type(models[0]):
                raise ConfigError(f"pack member {i} ({type(models[i]).__name__}) does not have the shape of member "
                                  f"0 ({type(models[0]).__name__}): only runs of one architecture can be packed")
        self.models = list(models)
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self._call = vmap(self._forward_one, in_dims=(0, 0, None), randomness="different")
        if not models:  # nothing to train (every member failed to start): an empty pack
            return
        # The structure the vectorised call runs: a copy without storage, fed the stacked tensors.
        self.base = copy.deepcopy(models[0]).to("meta")
        self.autocast_names: set[str] = set()  # parameters that autocast would cast: conv and linear ones
        for name, module in self.base.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_float_input)
            if isinstance(module, AUTOCAST_MODULES):
                module.register_forward_pre_hook(_weight_dtype_input)
                self.autocast_names.update(f"{name}.{k}" if name else k for k, _ in module.named_parameters())
        self.param_names = [k for k, _ in models[0].named_parameters()]
        self.buffer_names = [k for k, _ in models[0].named_buffers()]
        self._stack()

    def _forward_one(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                     x: torch.Tensor) -> torch.Tensor:
        # Autocast does not reach convolutions under vmap (their batching rule runs below it): cast here what
        # autocast would cast, conv and linear weights and (by the pre-hook) their inputs. Differentiable: the
        # gradients reach the float32 weights as autocast's do.
        device = x.device.type
        if torch.is_autocast_enabled(device):
            low = torch.get_autocast_dtype(device)
            params = {k: v.to(low) if k in self.autocast_names else v for k, v in params.items()}
        return functional_call(self.base, (params, buffers), (x,))

    def _stack(self) -> None:
        """Stack the members' current tensors and make each member's tensors views of its slice."""
        members = [(dict(m.named_parameters()), dict(m.named_buffers())) for m in self.models]
        self.params = {k: torch.stack([p[k].detach() for p, _ in members]).requires_grad_()
                       for k in self.param_names}
        self.buffers = {k: torch.stack([b[k] for _, b in members]) for k in self.buffer_names}
        for i, model in enumerate(self.models):
            params, _ = members[i]
            for k in self.param_names:
                params[k].data = self.params[k].detach()[i]  # same Parameter object: optimizer state stays valid
            for k in self.buffer_names:
                _set_buffer(model, k, self.buffers[k][i])

    def keep(self, indices: list[int]) -> None:
        """Keep only the members at `indices` (in that order); the others get tensors of their own again."""
        kept = set(indices)
        for i, model in enumerate(self.models):
            if i not in kept:
                _own_storage(model)
        self.models = [self.models[i] for i in indices]
        if self.models:
            self._stack()

    def __len__(self) -> int:
        return len(self.models)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs of every member for the shared input `x`: shape (K, batch, units)."""
        return self._call(self.params, self.buffers, x)

    def train(self, mode: bool = True) -> None:
        self.base.train(mode)

    def zero_grad(self) -> None:
        for t in self.params.values():
            t.grad = None

    def scatter_grads(self) -> None:
        """Give each member's parameters their slice of the stacked gradients (views, no copies)."""
        for i, model in enumerate(self.models):
            for k, p in model.named_parameters():
                grad = self.params[k].grad
                p.grad = None if grad is None else grad[i]


# Modules whose computation autocast runs in the lower precision (the convolutions and matmuls of our models).
AUTOCAST_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _weight_dtype_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A conv or linear layer computes in its weight's dtype (bf16 under autocast in a pack): cast its input."""
    x = args[0]
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != module.weight.dtype:
        return (x.to(module.weight.dtype), *args[1:])
    return None


def _float_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Batch norm under vmap refuses bf16 input with float32 weights (plain autocast allows it): give it float32
    (autocast casts again before the next convolution or linear layer)."""
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
        return (x.float(), *args[1:])
    return None


def _set_buffer(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    module._buffers[attr] = value


def _own_storage(model: nn.Module) -> None:
    """Give a model that leaves its pack copies of its tensors, so that it no longer shares the pack's storage."""
    for p in model.parameters():
        p.data = p.data.clone()
        p.grad = None
    for name, b in list(model.named_buffers()):
        _set_buffer(model, name, b.clone())


def check_packable(trainers: list[Trainer]) -> None:
    """Members must share the recording, the device and every setting outside the pack member keys
    (`trainer.pack_rule`, the rule `plan_packs` groups a search's runs by)."""
    lead = trainers[0]
    for i, t in enumerate(trainers[1:], 1):
        if t.data is not lead.data or t.device != lead.device:
            raise ConfigError(f"pack member {i} uses another recording or device than member 0")
    conflict = pack_conflict([t.cfg for t in trainers])
    if conflict is not None:
        raise ConfigError(conflict)


class PackedTrainer:
    """Trains the members' Trainers together, one shared batch stream, each member judged and saved on its own."""

    def __init__(self, trainers: list[Trainer], on_epoch: Callable[[list[dict[str, float]]], None] | None = None):
        check_packable(trainers)
        self.trainers = list(trainers)
        self.lead = trainers[0]
        self.on_epoch = on_epoch
        self.generator = self.lead.shuffle_gen
        for t in self.trainers:  # one batch order for all; each checkpoint records the pack's generator state
            t.shuffle_gen = self.generator

    def fit(self, resumes: list[dict[str, Any] | None],
            on_done: Callable[[int, FitResult | Exception], None]) -> None:
        """Train every member until it stops; `on_done(i, result or error)` is called once for each member i as
        soon as it is over, while the others go on. KeyboardInterrupt (Ctrl-C, SIGTERM) propagates."""
        with tf32(self.lead.cfg["precision"] == "tf32"):
            self._fit(resumes, on_done)

    def _fit(self, resumes: list[dict[str, Any] | None],
             on_done: Callable[[int, FitResult | Exception], None]) -> None:
        active: list[int] = []
        for i, (t, resume) in enumerate(zip(self.trainers, resumes)):
            try:
                t.start(resume)
                active.append(i)
            except Exception as exc:  # e.g. a checkpoint that does not fit the model: this member only
                on_done(i, exc)
        first_resume = next((resumes[i] for i in active if resumes[i] is not None), None)
        if first_resume is not None:  # the batch stream and noise go on from one member's checkpoint
            self.generator.set_state(first_resume["shuffle_rng"])
            torch.set_rng_state(first_resume["torch_rng"])
        pack = StackedModels([self.trainers[i].model for i in active])

        def leave(members: dict[int, FitResult | Exception]) -> None:
            """Members that are over leave the pack before their results are handed on."""
            nonlocal active
            if not members:
                return
            # the pack holds the active members in order: keep the positions of those that go on
            pack.keep([pos for pos, i in enumerate(active) if i not in members])
            active = [i for i in active if i not in members]
            for i, outcome in members.items():
                on_done(i, outcome)

        while active:
            over: dict[int, FitResult | Exception] = {}
            epochs: dict[int, int] = {}
            for i in active:
                try:
                    epoch = self.trainers[i].next_epoch()
                    if epoch is None:
                        over[i] = self.trainers[i].result()
                    else:
                        epochs[i] = epoch
                except Exception as exc:
                    over[i] = exc
            leave(over)
            if not active:
                break
            members = [self.trainers[i] for i in active]
            t0 = time.perf_counter()
            losses = self._train_epoch(pack, members)
            train_seconds = time.perf_counter() - t0
            val_out = self._predict(pack, self.lead.data.val)
            test_out = self._predict(pack, self.lead.data.test)
            over, reported = {}, []
            for j, i in enumerate(active):
                t = self.trainers[i]
                try:
                    if not math.isfinite(losses[j]):
                        raise TrainingDiverged(f"training loss became {losses[j]} in epoch {epochs[i]}; lower lr "
                                               f"(now {t.cfg['lr']:g}) or check the recording")
                    metrics = t.scored({"train_loss": losses[j]}, val_out[j], test_out[j], t0, train_seconds)
                    metrics["pack_size"] = float(len(active))
                    t.end_epoch(epochs[i], metrics)
                    reported.append(metrics)
                except Exception as exc:
                    over[i] = exc
            if self.on_epoch is not None:
                self.on_epoch(reported)
            leave(over)

    def _train_epoch(self, pack: StackedModels, members: list[Trainer]) -> list[float]:
        """One pass over the shared training batches; each member's Adam steps its own slice. Mean losses."""
        lead = self.lead
        cfg = lead.cfg
        use_l1 = any(t.cfg["l1"] > 0 for t in members)
        total: torch.Tensor | float = 0.0  # takes the losses' dtype (float64 for a float64 pack)
        n = 0
        pack.train(True)
        for x, y in lead.data.train.batches(cfg["batch_size"], shuffle=cfg["shuffle"], generator=self.generator,
                                            drop_last=True):
            with lead.autocast():
                out = full_precision(pack(x))  # (K, batch, units)
            losses = self._losses(out, y)
            if use_l1:  # each member's own l1 (l1_per_sample is shared: it is in the pack key)
                losses = losses + torch.stack([l1_penalty(t.cfg, out[j]) for j, t in enumerate(members)])
            pack.zero_grad()
            losses.sum().backward()  # members are independent: each gets the gradient of its own loss
            pack.scatter_grads()
            for t in members:
                t.optimizer.step()
            total = total + losses.detach() * len(y)
            n += len(y)
        return (total / n).tolist()

    def _losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each member's data loss (the mean over batch and units, as the member's own loss function takes it)."""
        target = y.expand_as(out)
        if self.lead.cfg["lossfxn"] == "PoissonNLLLoss":
            per = F.poisson_nll_loss(out, target, log_input=self.lead.cfg["log_poisson"], reduction="none")
        else:
            per = F.mse_loss(out, target, reduction="none")
        return per.mean(dim=(1, 2))

    @torch.no_grad()
    def _predict(self, pack: StackedModels, windows: WindowSet) -> torch.Tensor:
        """Every member's outputs for every sample of `windows`, in batches, in eval mode: (K, samples, units)."""
        pack.train(False)
        with self.lead.autocast():
            return torch.cat([full_precision(pack(x)) for x, _ in windows.batches(score_batch(self.lead.cfg))], dim=1)
