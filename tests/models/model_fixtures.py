"""Helpers for tests/models: tiny random-initialised models in their real on-disk formats (no downloads)."""

from __future__ import annotations

from tiny_models import WORDS, perturb, save_clip_tokenizer, save_tiny_tokenizer  # noqa: F401 (re-exported)

from magic_pl.calibration import FeatureSpaceCalibrator, weight_space_calibration
from magic_pl.merging import merge
from magic_pl.models.base import MergeSetup


def llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=1,
              bos_token_id=4, eos_token_id=5)
    kw.update(overrides)
    return LlamaConfig(**kw)


def bert_config(**overrides):
    from transformers import BertConfig

    kw = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=64, pad_token_id=1)
    kw.update(overrides)
    return BertConfig(**kw)


def clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=80, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=16,
    )


def calibrate(setup: MergeSetup, method: str = "task_arithmetic", *, batches=None, wsc: bool = True, **options):
    """Merge + WSC (+ FSC when ``batches`` is given: {task_index: [args tuple or kwargs dict]}) -> calibrated body."""
    tvs = setup.task_vectors()
    tau = merge(method, tvs, **options)
    if wsc:
        tau = weight_space_calibration(tau, tvs)
    model = setup.merged_model(tau)
    report = None
    if batches is not None:
        cal = FeatureSpaceCalibrator(setup.base, model, tvs, modules=setup.fsc_modules(model))
        for k, items in batches.items():
            for item in items:
                if isinstance(item, dict):
                    cal.update(k, **item)
                else:
                    cal.update(k, *item)
        report = cal.fold()
        assert not report.wrapped, f"modules were wrapped instead of folded: {report.wrapped}"
    return model, tau, report
