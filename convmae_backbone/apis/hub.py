"""Our models by name in mmpretrain: its ``get_model``, ``list_models``, ``inference_model``,
``ImageClassificationInferencer`` and ``FeatureExtractor`` look names up in ``ModelHub``, which accepts
third-party model indexes. ``import convmae_backbone`` registers the pretraining and classification families
(:data:`MMPRETRAIN_FAMILIES`) of our model index there.

mmdet's ``DetInferencer`` and mmseg's ``MMSegInferencer`` look names up only in their own package's model index
(mmengine's ``BaseInferencer`` reads ``<scope>/.mim/model-index.yml``); give them
``convmae_backbone.config_path(name)`` instead.
"""
from mmpretrain.apis import ModelHub

from ..resources import metafile_models, resource_root

#: The config families of the model index that mmpretrain builds (its scope or mmengine's).
MMPRETRAIN_FAMILIES = ('configs/pretrain/metafile.yml', 'configs/mmpretrain/metafile.yml')


def register_mmpretrain_models() -> None:
    """Register :data:`MMPRETRAIN_FAMILIES` in mmpretrain's ``ModelHub`` (config paths resolved against the
    package's resources); a second call does nothing (``ModelHub`` refuses a name registered twice)."""
    root = resource_root()
    for family in MMPRETRAIN_FAMILIES:
        if all(ModelHub.has(model['Name'].lower()) for model in metafile_models(root / family)):
            continue
        ModelHub.register_model_index(root / family, config_prefix=root)
