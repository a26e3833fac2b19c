"""Channel pruning: integrated-gradient channel importance, zeroing and masking, and the pruning state machine.

After the normal epochs the Trainer hands over to a `Pruner`, layer by layer, as the original (pruning.py:
prune_channels): snapshot the training state, zero the least important live channel of the current layer (its
filter, and its bias with zero_bias), train `prune_intvl` epochs with that channel held at zero, then keep the
pruning (and try the next channel) or, if validation correlation fell by more than the tolerance, restore the
snapshot and move to the next layer. The original's restore reloaded a state_dict that aliased the live weights,
so it restored nothing but the channel; ours restores a deep copy (weights and optimizer). Everything the Pruner
knows is in `state_dict()`, so a checkpoint resumes in the middle of the phase.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trainer.errors import ConfigError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
ADAM_BUFFERS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def channel_conv(layer: nn.Module) -> nn.Module | None:
    """The conv whose output channel c is the layer's channel c: the layer itself, or the last conv of a stack."""
    if isinstance(layer, CONVS):
        return layer
    convs = [m for m in layer.modules() if isinstance(m, CONVS)]
    return convs[-1] if convs else None


@torch.no_grad()
def zero_channels(conv: nn.Module, channels: list[int], optimizer: torch.optim.Optimizer | None = None,
                  bias: bool = True) -> None:
    """Zero output channels of `conv` (filter, and bias unless `bias` is false) and their Adam moments, so the
    channels stay silent."""
    if not channels:
        return
    idx = torch.tensor(channels, dtype=torch.long, device=conv.weight.device)
    params = [p for p in (conv.weight, conv.bias if bias else None) if p is not None]
    for p in params:
        p.index_fill_(0, idx, 0.0)
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for key in ADAM_BUFFERS:
            if key in state:
                state[key].index_fill_(0, idx, 0.0)


def integrated_gradients(model: nn.Module, layer: nn.Module, x: torch.Tensor, alpha_steps: int,
                         batch_size: int = 500, per_cell: bool = False) -> torch.Tensor:
    """Integrated-gradient attribution of the sum of the model's outputs to each unit of `layer`'s output, for the
    samples `x`: (B, C, H, W) like the layer's output; with `per_cell`, of each output cell's output separately:
    (n_cells, B, C, H, W) (the original's integrated_gradient with `chans` one cell).

    As the original (utils.py: integrated_gradient): the stimulus is scaled by alpha along a straight path from a
    zero stimulus, alpha in linspace(0, 1, alpha_steps); at each alpha the layer's output a(alpha) and the gradient
    g(alpha) of the sum of all outputs with respect to it; attribution = sum_k g(alpha_k) * (a(alpha_k) -
    a(alpha_k-1)), k = 1..alpha_steps-1. Summed over units it approaches F(x) - F(0) as alpha_steps grows. Eval
    mode, so neither noise nor batch-norm statistics change and no random numbers are drawn; `batch_size` samples
    at a time.
    """
    if alpha_steps < 2:
        raise ValueError("alpha_steps must be >= 2: the path needs both ends")
    if len(x) == 0:
        raise ValueError("integrated_gradients needs at least one sample")
    hooked: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        hooked["act"] = out

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(keep)
    chunks = []
    try:
        with torch.enable_grad():
            for i in range(0, len(x), batch_size):
                chunk = x[i:i + batch_size]
                attribution, previous = None, None
                for alpha in torch.linspace(0, 1, alpha_steps).tolist():
                    out = model(chunk * alpha)
                    act = hooked["act"]
                    targets = [out[:, k].sum() for k in range(out.shape[1])] if per_cell else [out.sum()]
                    grad = torch.stack([torch.autograd.grad(t, act, retain_graph=j < len(targets) - 1)[0]
                                        for j, t in enumerate(targets)])
                    if previous is not None:
                        step = grad * (act.detach() - previous)
                        attribution = step if attribution is None else attribution + step
                    previous = act.detach()
                chunks.append(attribution if per_cell else attribution[0])
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(chunks, dim=1 if per_cell else 0)


def channel_importance(model: nn.Module, layer: nn.Module, x: torch.Tensor, alpha_steps: int,
                       abssum: bool = False, batch_size: int = 500) -> torch.Tensor:
    """Importance of each output channel of `layer` over the samples `x`, (C,) float64, as the original's
    prune_channels (pruning.py): of the integrated-gradient attribution, the mean over samples of |the sum over
    positions| (abssum false) or of the sum over positions of |attribution| (abssum true)."""
    per_position = integrated_gradients(model, layer, x, alpha_steps, batch_size).flatten(2)  # (B, C, positions)
    per_sample = per_position.abs().sum(-1) if abssum else per_position.sum(-1).abs()
    return per_sample.double().mean(0).cpu()


def build_pruner(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 cfg: dict[str, Any]) -> Pruner:
    """The Pruner of a run with prune true; ConfigError for a model or prune_layers entry that cannot be pruned."""
    return Pruner(model, optimizer, scheduler, prunable_layers(model, cfg), interval=cfg["prune_intvl"],
                  tolerance=cfg["prune_tolerance"], alpha_steps=cfg["alpha_steps"], abssum=cfg["abssum"],
                  zero_bias=cfg["zero_bias"])


def prunable_layers(model: nn.Module, cfg: dict[str, Any]) -> list[str]:
    """The layers a run with prune true prunes (prune_layers, empty = all); ConfigError for a model or a
    prune_layers entry that cannot be pruned (also checked before any run starts)."""
    model_type = cfg["model_type"]
    available = model.conv_layers() if callable(getattr(model, "conv_layers", None)) else {}
    if not available:
        raise ConfigError(f"prune needs a model with intermediate conv layers; model_type {model_type} has none: "
                          "set prune to false or use a conv model such as BNCNN")
    layers = list(cfg["prune_layers"]) or list(available)
    for name in layers:
        if name not in available:
            raise ConfigError(f"prune_layers names '{name}', which model_type {model_type} does not have: its "
                              f"layers are {', '.join(available)}; fix prune_layers (empty = all of them)")
        if layers.count(name) > 1:
            raise ConfigError(f"prune_layers lists '{name}' twice: give each layer once")
        if channel_conv(available[name]) is None:
            raise ConfigError(f"prune_layers: layer '{name}' of model_type {model_type} holds no convolution "
                              "whose channels could be zeroed; leave it out of prune_layers")
    return layers


class Pruner:
    """The pruning phase of one run: layers in order, zeroed channels, the pending pruning and its undo copy."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, layers: list[str],
                 interval: int, tolerance: float, alpha_steps: int, abssum: bool = False, zero_bias: bool = True):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.convs = {name: channel_conv(layer) for name, layer in model.conv_layers().items() if name in layers}
        self.layers = list(layers)
        self.interval, self.tolerance = interval, tolerance
        self.alpha_steps, self.abssum, self.zero_bias = alpha_steps, abssum, zero_bias
        self.n_channels = {name: self.convs[name].out_channels for name in self.layers}
        self.active = False  # True once the normal epochs are over
        self.normal_epochs = 0  # how many epochs of normal training preceded pruning
        self.layer_index = 0
        self.current_r = math.nan  # validation r of the model as it is now
        self.pruned: dict[str, list[int]] = {name: [] for name in self.layers}  # kept prunings
        self.pending: dict[str, Any] | None = None  # the pruning being tried, with the snapshot to revert to
        self.events: list[dict[str, Any]] = []  # every judged pruning, kept or reverted

    # ---- what is zeroed -------------------------------------------------------------------------------------------
    def zeroed(self) -> dict[str, list[int]]:
        """Channels that are zero in the model now, per layer: the kept prunings plus the one being tried."""
        out = {name: sorted(chans) for name, chans in self.pruned.items()}
        if self.pending is not None:
            out[self.pending["layer"]] = sorted(out[self.pending["layer"]] + [self.pending["channel"]])
        return out

    def metrics(self) -> dict[str, float]:
        """Per-layer counts of zeroed channels, logged every epoch as pruned_<layer>."""
        return {f"pruned_{name}": float(len(chans)) for name, chans in self.zeroed().items()}

    def mask(self) -> None:
        """Put the zeroed channels (weights and Adam moments) back to zero: called after every optimiser step."""
        for name, chans in self.zeroed().items():
            zero_channels(self.convs[name], chans, self.optimizer, bias=self.zero_bias)

    # ---- the schedule -----------------------------------------------------------------------------------------------
    def start(self, epoch: int, val_r: float) -> None:
        """The normal epochs ended at `epoch` with validation r `val_r`: pruning starts with the next epoch."""
        self.active, self.normal_epochs, self.current_r = True, epoch, val_r

    def current_layer(self) -> str | None:
        """The layer being pruned: skip layers down to one live channel; None when no layer is left."""
        while self.layer_index < len(self.layers):
            name = self.layers[self.layer_index]
            if self.n_channels[name] - len(self.pruned[name]) > 1:
                return name
            self.layer_index += 1
        return None

    def begin(self, epoch: int, sample: Callable[[int], torch.Tensor]) -> bool:
        """Before `epoch`: zero the least important live channel of the current layer, judged on the samples
        `sample(epoch)` gives; False if no layer is left."""
        if self.pending is not None:  # resumed in the middle of an interval
            return True
        name = self.current_layer()
        if name is None:
            return False
        snapshot = copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                  "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None})
        importance = channel_importance(self.model, self.model.conv_layers()[name], sample(epoch), self.alpha_steps,
                                        self.abssum)
        importance[torch.tensor(self.pruned[name], dtype=torch.long)] = math.inf  # already pruned: not candidates
        channel = int(importance.argmin())
        self.pending = {"layer": name, "channel": channel, "baseline": self.current_r, "epoch": epoch,
                        "epochs_trained": 0, "importance": importance.tolist(), "snapshot": snapshot}
        self.mask()
        return True

    def end_epoch(self, epoch: int, val_r: float) -> dict[str, Any] | None:
        """After `epoch` of the interval: judge the pending pruning once it has trained `interval` epochs."""
        if self.pending is None:
            return None
        p = self.pending
        p["epochs_trained"] += 1
        if p["epochs_trained"] < self.interval:
            return None
        self.pending = None
        reverted = val_r < p["baseline"] - self.tolerance
        if reverted:  # restore the copy taken before zeroing: the channel comes back, the next layer is tried
            snap = p["snapshot"]
            self.model.load_state_dict(snap["model"])
            self.optimizer.load_state_dict(snap["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(snap["scheduler"])
            self.layer_index += 1
            self.current_r = p["baseline"]
        else:
            self.pruned[p["layer"]].append(p["channel"])
            self.current_r = val_r
        event = {"layer": p["layer"], "channel": p["channel"], "begun_epoch": p["epoch"], "judged_epoch": epoch,
                 "baseline_val_pearson": p["baseline"], "after_val_pearson": val_r, "reverted": reverted,
                 "importance": p["importance"]}
        self.events.append(event)
        return event

    # ---- saving -----------------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """The pruning record for pruning.json: layers, channels pruned, every judged pruning."""
        return {"layers": self.layers, "n_channels": self.n_channels, "normal_epochs": self.normal_epochs,
                "pruned": self.zeroed(), "tolerance": self.tolerance, "interval": self.interval,
                "prunings": self.events, "reverted": [{"layer": e["layer"], "channel": e["channel"]}
                                                      for e in self.events if e["reverted"]]}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the phase from a checkpoint (the pending pruning's snapshot included)."""
        return {"layers": self.layers, "active": self.active, "normal_epochs": self.normal_epochs,
                "layer_index": self.layer_index, "current_r": self.current_r, "pruned": self.pruned,
                "pending": self.pending, "events": self.events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` output; the model's weights already hold the zeros."""
        if list(state["layers"]) != self.layers:
            raise ConfigError(f"checkpoint pruned layers {state['layers']} but prune_layers gives {self.layers}: "
                              "resume with the configuration the run was started with")
        state = copy.deepcopy(state)
        self.active, self.normal_epochs = state["active"], state["normal_epochs"]
        self.layer_index, self.current_r = state["layer_index"], state["current_r"]
        self.pruned, self.pending, self.events = state["pruned"], state["pending"], state["events"]
        self.mask()
