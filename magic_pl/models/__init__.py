"""Model families and checkpoint I/O: adapters that turn a user's checkpoints into (base body, experts, per-task
heads) for merging and calibration, and save the calibrated model in the format it came in.

- :class:`TimmAdapter` (any timm architecture), :class:`CLIPAdapter` (vision tower + zero-shot heads, the 8-task
  benchmark), :class:`HFClassifierAdapter` / :class:`SequenceClassificationAdapter` /
  :class:`ImageClassificationAdapter` (encoder merged, classifier heads per task), :class:`CausalLMAdapter` (whole
  model, tied embeddings kept tied), :class:`LoRAAdapter` (PEFT LoRA adapters as exact dense task vectors;
  :func:`merge_lora_lowrank` + :func:`save_lora_adapter` for a LoRA output).
- :func:`stream_merge`: merge + WSC of models larger than memory, tensor by tensor from sharded safetensors;
  :func:`streaming_fsc` / :func:`lazy_calibration_sources` for FSC on them.
- I/O: :class:`SafetensorsReader`, :class:`ShardedSafetensorsWriter`, :func:`save_sharded_safetensors`,
  :func:`save_pretrained_atomic`.

Adapters import their model libraries (timm, transformers) lazily: importing this package is cheap.
"""

from magic_pl.models.base import LazyTaskVector, MergeSetup, ModelAdapter, find_tied_keys
from magic_pl.models.causal_lm import CausalLMAdapter
from magic_pl.models.clip import CLIPAdapter, load_zeroshot_heads
from magic_pl.models.heads import MultiTaskModel, TaskModel, ZeroShotHead, zeroshot_weights
from magic_pl.models.io import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    copy_support_files,
    save_pretrained_atomic,
    save_sharded_safetensors,
)
from magic_pl.models.lora import (
    LoRAAdapter,
    LoRACheckpoint,
    LowRankDelta,
    merge_lora_lowrank,
    save_lora_adapter,
)
from magic_pl.models.sequence import HFClassifierAdapter, ImageClassificationAdapter, SequenceClassificationAdapter
from magic_pl.models.streaming import StreamReport, lazy_calibration_sources, stream_merge, streaming_fsc
from magic_pl.models.timm import TimmAdapter, load_timm_saved

__all__ = [
    "MergeSetup",
    "ModelAdapter",
    "LazyTaskVector",
    "find_tied_keys",
    "TimmAdapter",
    "load_timm_saved",
    "CLIPAdapter",
    "load_zeroshot_heads",
    "HFClassifierAdapter",
    "SequenceClassificationAdapter",
    "ImageClassificationAdapter",
    "CausalLMAdapter",
    "LoRAAdapter",
    "LoRACheckpoint",
    "LowRankDelta",
    "merge_lora_lowrank",
    "save_lora_adapter",
    "TaskModel",
    "MultiTaskModel",
    "ZeroShotHead",
    "zeroshot_weights",
    "SafetensorsReader",
    "ShardedSafetensorsWriter",
    "save_sharded_safetensors",
    "save_pretrained_atomic",
    "copy_support_files",
    "stream_merge",
    "StreamReport",
    "streaming_fsc",
    "lazy_calibration_sources",
]
