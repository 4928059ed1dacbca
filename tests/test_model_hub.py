"""Our models by name: mmpretrain's get_model, list_models, inference_model, ImageClassificationInferencer and
FeatureExtractor (model index registered on import); mmdet's DetInferencer and mmseg's MMSegInferencer with the
config that ``config_path(name)`` finds (they look names up in their own package's index only). Tiny models,
random weights saved to temporary files: nothing is downloaded."""
import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope
from PIL import Image

import convmae_backbone  # noqa: F401  (registers the model index)
from convmae_backbone import config_path, testing
from convmae_backbone.resources import model_configs
from mmpretrain import (FeatureExtractor, ImageClassificationInferencer, get_model, inference_model,
                        list_models)

FINE_TUNED = 'convmae-b_8xb128-100e_in1k'
NUM_CLASSES = 7


def tiny(**extra) -> dict:
    """get_model keywords that shrink the classifier (merged into the config's ``model``)."""
    dims = testing.TINY_ENCODER['embed_dims']
    return dict(backbone=dict(testing.TINY_ENCODER, img_size=224, drop_path_rate=0.0),
                head=dict(in_channels=dims[2], num_classes=NUM_CLASSES), **extra)


@pytest.fixture(autouse=True)
def no_default_scope():
    """As in a fresh process, where mmpretrain's by-name API is used: no default scope (an earlier test's Runner
    leaves 'mmengine' current, and mmpretrain's inferencers build their pipeline in the current scope)."""
    saved = dict(DefaultScope._instance_dict)
    DefaultScope._instance_dict.clear()
    yield
    DefaultScope._instance_dict.update(saved)


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = get_model(FINE_TUNED, **tiny())
    path = str(tmp_path_factory.mktemp('hub') / 'tiny_classifier.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, path)
    return path


@pytest.fixture(scope='module')
def image(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp('img') / 'photo.png')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


def test_list_models_finds_the_pretraining_and_classification_models():
    assert list_models('*convmae*') == sorted(['convmae-b_8xb128-100e_in1k', 'convmae-b_linear-8xb2048-90e_in1k',
                                               'convmae-b_8xb128-1600e_in1k', 'convmae-tiny_demo',
                                               'fastconvmae-b_8xb64-50e_in1k',
                                               'mr-convmae-b_8xb128-200e_in1k'])
    assert list_models('convmae', task='Image Classification') == ['convmae-b_8xb128-100e_in1k',
                                                                   'convmae-b_linear-8xb2048-90e_in1k']


def test_get_model_by_name_builds_the_config_and_loads_weights(weights):
    model = get_model(FINE_TUNED, pretrained=weights, **tiny())
    assert model._config.filename == config_path(FINE_TUNED)
    assert type(model.backbone).__name__ == 'ConvMAE' and model.backbone.out_type == 'avg_featmap'
    saved = torch.load(weights, weights_only=True)['state_dict']
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    pretrainer = get_model('convmae-b_8xb128-1600e_in1k', img_size=64, **testing.TINY_ENCODER,
                           **testing.TINY_DECODER)
    assert type(pretrainer).__name__ == 'ConvMAEPretrainer'


def test_inference_by_name_agrees_with_the_feature_extractor(weights, image):
    """inference_model, ImageClassificationInferencer and FeatureExtractor by name, same weights: the scores are
    the softmax of the head applied to the extracted features."""
    model = get_model(FINE_TUNED, pretrained=weights, **tiny())
    result = inference_model(model, image)
    by_name = ImageClassificationInferencer(FINE_TUNED, pretrained=weights, **tiny())(image)[0]
    features = FeatureExtractor(FINE_TUNED, pretrained=weights, **tiny())(image)[0]
    assert features[0].shape == (testing.TINY_ENCODER['embed_dims'][2],)
    with torch.no_grad():
        scores = model.head.fc(features[0][None]).softmax(-1)[0]
    np.testing.assert_allclose(result['pred_scores'], scores.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_name['pred_scores'], result['pred_scores'], rtol=0, atol=1e-6)
    assert result['pred_label'] == int(scores.argmax())


def test_models_without_classification_results_have_no_inferencer():
    with pytest.raises(NotImplementedError, match='No available inferencer'):
        inference_model('convmae-b_8xb128-1600e_in1k', np.zeros((32, 32, 3), np.uint8))


def test_config_path_finds_every_model_of_the_index():
    for name, rel in model_configs().items():
        assert config_path(name) == config_path(rel[len('configs/'):])
    with pytest.raises(FileNotFoundError, match='mask-rcnn_convmae-b_fpn_lsj-25e_coco'):
        config_path('mask-rcnn_convmae-b_nonexistent')


@pytest.mark.parametrize('task', ['det', 'seg'])
def test_det_and_seg_inferencers_on_the_config_of_a_name(task, tmp_path, image):
    """DetInferencer / MMSegInferencer on the shipped config (shrunk by ``testing``) with weights from a file."""
    if task == 'det':
        from mmdet.apis import DetInferencer as Inferencer
        from mmdet.registry import MODELS
        name, cfg = 'mask-rcnn_convmae-b_fpn_lsj-25e_coco', testing.tiny_det_config(str(tmp_path), str(tmp_path))
        meta = dict(classes=testing.DET_CLASSES)
    else:
        from mmseg.apis import MMSegInferencer as Inferencer
        from mmseg.registry import MODELS
        name, cfg = 'upernet_convmae-b_8xb2-160k_ade20k-512x512', testing.tiny_seg_config(str(tmp_path),
                                                                                          str(tmp_path))
        meta = dict(classes=testing.SEG_CLASSES, palette=testing.SEG_PALETTE)
    assert cfg.filename == config_path(name)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = MODELS.build(cfg.model)
    path = str(tmp_path / 'weights.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {'dataset_meta': meta}}, path)
    inferencer = Inferencer(model=cfg, weights=path, device='cpu')
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in inferencer.model.state_dict().items())
    predictions = inferencer(image)['predictions']
    if task == 'det':
        assert len(predictions) == 1 and {'labels', 'scores', 'bboxes'} <= set(predictions[0])
    else:
        assert np.asarray(predictions).shape == (96, 128)  # one class index per pixel of the image
