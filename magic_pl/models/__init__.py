"""Model families and checkpoint I/O: adapters that turn a user's checkpoints into (base body, experts, per-task
heads) for merging and calibration, and save the calibrated model in the format it came in.

- :class:`TimmAdapter` (any timm architecture), :class:`CLIPAdapter` (vision tower + zero-shot heads, the 8-task
  benchmark), :class:`HFClassifierAdapter` / :class:`SequenceClassificationAdapter` /
  :class:`ImageClassificationAdapter` (encoder merged, classifier heads per task), :class:`CausalLMAdapter` (whole
  model, tied embeddings kept tied), :class:`LoRAAdapter` (PEFT LoRA adapters as exact dense task vectors;
  :func:`merge_lora_lowrank` + :func:`save_lora_adapter` for a LoRA output).
- :func:`stream_merge`: merge + WSC of models larger than memory, tensor by tensor from sharded safetensors;
  :func:`streaming_fsc` / :func:`~magic_pl.models.streaming.lazy_calibration_sources` for FSC on them;
  :func:`layerwise_fsc`: merge + FSC one block at a time (Llama family, BERT and ViT classifiers, CLIP vision towers;
  a classifier's shared encoder alone with ``body_of``), for models whose merge
  does not fit in memory either.
- A new model family subclasses :class:`ModelAdapter`, whose ``setup`` returns a :class:`MergeSetup`.

Everything else is imported from its module, e.g. the I/O helpers (``from magic_pl.models.io import
SafetensorsReader, save_sharded_safetensors``) and ``magic_pl.models.heads``.

Adapters import their model libraries (timm, transformers) lazily: importing this package is cheap.
"""

from magic_pl.models.base import MergeSetup, ModelAdapter
from magic_pl.models.causal_lm import CausalLMAdapter
from magic_pl.models.clip import CLIPAdapter
from magic_pl.models.layerwise import layerwise_fsc
from magic_pl.models.lora import LoRAAdapter, merge_lora_lowrank, save_lora_adapter
from magic_pl.models.sequence import (
    HFClassifierAdapter,
    ImageClassificationAdapter,
    SequenceClassificationAdapter,
    load_classifier,
)
from magic_pl.models.streaming import stream_merge, streaming_fsc
from magic_pl.models.timm import TimmAdapter

__all__ = [
    "ModelAdapter",
    "MergeSetup",
    "TimmAdapter",
    "CLIPAdapter",
    "HFClassifierAdapter",
    "SequenceClassificationAdapter",
    "ImageClassificationAdapter",
    "load_classifier",
    "CausalLMAdapter",
    "LoRAAdapter",
    "merge_lora_lowrank",
    "save_lora_adapter",
    "stream_merge",
    "streaming_fsc",
    "layerwise_fsc",
]
