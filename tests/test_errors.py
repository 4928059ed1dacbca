"""Bad input gets an error naming the cause: checkpoints that are not checkpoints, checkpoints of the wrong kind,
unknown config keywords and malformed ``--cfg-options``; the tools print ``error: ...`` and exit 1."""
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_ARCH
from mmengine.registry import MODELS
from PIL import Image

from convmae_backbone.apis import cli, visualization
from convmae_backbone.checkpoint import CheckpointError, safe_torch_load
from convmae_backbone.apis.export import encoder_state_dict, export_backbone


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / 'tools' / name), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def tiny_pretrainer():
    return MODELS.build(dict(type='ConvMAEPretrainer', img_size=32, **TINY_ARCH))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('these are notes, not weights\n')
    return path


@pytest.fixture
def image(tmp_path):
    path = tmp_path / 'img.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_safe_torch_load_turns_any_failure_into_checkpoint_error(text_file, tmp_path):
    # torch.load alone raises IndexError (KeyError: 101 for other texts)
    with pytest.raises(CheckpointError, match=r"notes\.txt' could not be read .*not a PyTorch checkpoint"):
        safe_torch_load(text_file)
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'empty\.pth'):
        safe_torch_load(tmp_path / 'empty.pth')
    with pytest.raises(CheckpointError, match='does not exist'):
        safe_torch_load(tmp_path / 'missing.pth')


@pytest.mark.parametrize('tool', ['export_backbone.py', 'visualize_reconstruction.py'])
def test_tools_report_a_text_file_given_as_checkpoint(tool, text_file, image, tmp_path):
    args = [str(text_file), str(tmp_path / 'out.pth')] if tool == 'export_backbone.py' else \
        [str(text_file), str(image), '--out', str(tmp_path / 'out.png')]
    proc = run_tool(tool, *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: checkpoint file') and str(text_file) in last and 'not a PyTorch checkpoint' in last
    assert not (tmp_path / 'out.pth').exists() and not (tmp_path / 'out.png').exists()


def test_visualiser_names_a_detector_checkpoint(tmp_path, image):
    state = {f'backbone.{k}': v for k, v in encoder_state_dict(tiny_pretrainer().state_dict()).items()}
    state.update({'neck.lateral_convs.0.conv.weight': torch.zeros(1), 'rpn_head.rpn_conv.weight': torch.zeros(1),
                  'roi_head.bbox_head.fc_cls.weight': torch.zeros(1)})
    torch.save({'state_dict': state, 'meta': {}}, tmp_path / 'mask_rcnn.pth')
    with pytest.raises(CheckpointError, match=r'mask_rcnn\.pth is not a ConvMAE pretraining checkpoint \(it holds '
                                              r'a detector: backbone, neck, roi_head, rpn_head\); give a checkpoint '
                                              r'written by tools/pretrain\.py'):
        visualization.visualize(str(tmp_path / 'mask_rcnn.pth'), [str(image)], str(tmp_path / 'o.png'))


def test_visualiser_names_a_resnet_and_a_segmentor(tmp_path, image):
    resnet = OrderedDict([('conv1.weight', torch.zeros(64, 3, 7, 7)), ('bn1.weight', torch.zeros(64)),
                          ('layer1.0.conv1.weight', torch.zeros(64, 64, 1, 1)), ('fc.weight', torch.zeros(10, 64))])
    torch.save(resnet, tmp_path / 'resnet50.pth')
    with pytest.raises(CheckpointError, match=r'resnet50\.pth is not a ConvMAE pretraining checkpoint \(it holds '
                                              r'a ResNet-like network: bn1, conv1, fc, layer1\)'):
        visualization.visualize(str(tmp_path / 'resnet50.pth'), [str(image)], str(tmp_path / 'o.png'))
    torch.save({'state_dict': {'backbone.pos_embed': torch.zeros(1), 'decode_head.conv_seg.weight': torch.zeros(1)}},
               tmp_path / 'upernet.pth')
    with pytest.raises(CheckpointError, match=r'holds a segmentor: backbone, decode_head'):
        visualization.visualize(str(tmp_path / 'upernet.pth'), [str(image)], str(tmp_path / 'o.png'))


def test_visualiser_names_a_backbone_export(tmp_path, image):
    ckpt = tmp_path / 'full.pth'
    torch.save({'state_dict': tiny_pretrainer().state_dict()}, ckpt)
    export_backbone(str(ckpt), str(tmp_path / 'backbone.pth'))
    with pytest.raises(CheckpointError, match=r'backbone\.pth is not a ConvMAE pretraining checkpoint \(it holds a '
                                              r'ConvMAE encoder without the decoder'):
        visualization.visualize(str(tmp_path / 'backbone.pth'), [str(image)], str(tmp_path / 'o.png'))


@pytest.mark.parametrize('config, key, listed', [
    ('configs/pretrain/convmae-tiny_demo.py', 'model.embed_dimz', "ConvMAEPretrainer (model) has no keyword "
                                                                  "'embed_dimz' (did you mean 'embed_dims'?)"),
    ('configs/mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py', 'model.backbone.depht',
     "ConvMAE (model.backbone) has no keyword 'depht' (did you mean 'depths'?)"),
    ('configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py', 'model.decode_head.chanels',
     "UPerHead (model.decode_head) has no keyword 'chanels' (did you mean 'channels'?)"),
])
def test_unknown_model_keyword_is_named_with_the_existing_ones(config, key, listed):
    with pytest.raises(cli.ConfigError) as info:
        cli.load_config(str(ROOT / config), {key: 3})
    message = str(info.value)
    assert message.startswith(f'--cfg-options {key}: {listed}; its keywords: ')
    assert 'depths' in message.split('its keywords: ')[1] or 'channels' in message


def test_known_keywords_pass_including_nested_non_model_dicts():
    cfg = cli.load_config(str(ROOT / 'configs/mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py'),
                          {'model.backbone.depths': [1, 1, 3], 'model.backbone.init_cfg.checkpoint': 'x.pth',
                           'model.roi_head.bbox_head.num_classes': 3, 'model.train_cfg.rcnn.sampler.num': 64})
    assert cfg.model.backbone.depths == [1, 1, 3] and cfg.model.roi_head.bbox_head.num_classes == 3


def test_cfg_options_without_equals_names_the_token(capsys):
    parser = cli.add_common_args(__import__('argparse').ArgumentParser(prog='pretrain.py'))
    with pytest.raises(SystemExit) as info:
        cli.parse_args(parser, ['cfg.py', '--cfg-options', 'train_cfg.max_epochs=2', 'model.depth3'])
    assert info.value.code == 2
    assert "--cfg-options: 'model.depth3' is not KEY=VALUE" in capsys.readouterr().err


def test_pretrain_tool_reports_an_unknown_keyword_before_building_the_runner(tmp_path):
    proc = run_tool('pretrain.py', str(ROOT / 'configs/pretrain/convmae-tiny_demo.py'), '--work-dir',
                    str(tmp_path / 'w'), '--cfg-options', 'model.depht=3')
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: --cfg-options model.depht: ConvMAEPretrainer (model) has no keyword 'depht' (did you mean "
        "'depths'?); its keywords: ")
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'w').exists()  # nothing built, no log dumped


def _refusal(tool, argv, capsys) -> str:
    """The one line a tool prints when it refuses ``argv`` in process (what its ``__main__`` runs); asserts exit
    status 1 and no traceback."""
    main = {'train': cli.train, 'pretrain': cli.pretrain, 'test': cli.evaluate}[tool]
    with pytest.raises(SystemExit) as info:
        cli.run_tool(lambda: main([str(a) for a in argv]))
    assert info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith('error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err[-2000:]
    return lines[0]


DEMO = ROOT / 'configs/pretrain/convmae-tiny_demo.py'
DET = ROOT / 'configs/mmdet/mask-rcnn_convmae-b_fpn_lsj-25e_coco.py'
SEG = ROOT / 'configs/mmseg/upernet_convmae-b_8xb2-160k_ade20k-512x512.py'


@pytest.mark.parametrize('case', ['default_scope', 'schedule', 'schedule_ends_before_it_begins', 'auto_scale_lr', 'out_suffix', 'empty_folder',
                                  'missing_data_root', 'keyword_in_file', 'call_in_cfg_options',
                                  'call_with_comma_in_cfg_options'])
def test_every_refusal_prints_one_error_line_and_exits_1_before_a_work_dir(case, tmp_path, capsys, image):
    work = tmp_path / 'work'
    empty = tmp_path / 'empty'
    (empty / 'train').mkdir(parents=True)
    (empty / 'train' / 'notes.txt').write_text('no image here')
    typo = tmp_path / 'typo.py'
    typo.write_text(f"_base_ = [{str(DEMO)!r}]\nmodel = dict(depht=3)\n")
    data = f'train_dataloader.dataset.data_root={image.parent}'
    tool, argv, expected = {
        'default_scope': ('train', [DEMO], f"error: {DEMO}: default_scope must be one of ('mmdet', 'mmseg', "
                                           f"'mmpretrain'), got 'mmengine'"),
        'schedule': ('pretrain', [DEMO, '--cfg-options', data, 'train_cfg.max_epochs=1'],
                     'error: param_scheduler[1] (CosineAnnealingLR) begins at epoch 1 but train_cfg.max_epochs is 1'),
        'schedule_ends_before_it_begins': (
            'pretrain', [DEMO, '--cfg-options', data, 'param_scheduler.0.by_epoch=False', 'param_scheduler.0.begin=5',
                         'param_scheduler.0.end=5'],
            'error: param_scheduler[0] (LinearLR) begins at iteration 5 and ends at iteration 5; it must end after '
            'it begins'),
        'auto_scale_lr': ('train', [SEG, '--auto-scale-lr'],
                          f'error: {SEG} has no auto_scale_lr.base_batch_size; --auto-scale-lr needs it'),
        'out_suffix': ('test', [DET, tmp_path / 'x.pth', '--out', 'results.json'],
                       "error: --out must be a .pkl file for mmdet, got 'results.json'"),
        'empty_folder': ('pretrain', [DEMO, '--cfg-options', f'train_dataloader.dataset.data_root={empty}'],
                         f"error: train_dataloader.dataset: image folder '{empty / 'train'}' holds no images"),
        'missing_data_root': ('test', [SEG, tmp_path / 'x.pth'],
                              "error: test_dataloader.dataset.data_root 'data/ade/ADEChallengeData2016' is not a "
                              "folder"),
        'keyword_in_file': ('pretrain', [typo, '--cfg-options', data],
                            f"error: {typo}: model.depht: ConvMAEPretrainer (model) has no keyword 'depht' (did you "
                            f"mean 'depths'?); its keywords: "),
        'call_in_cfg_options': ('pretrain', [DEMO, '--cfg-options', data, "custom_hooks=[dict(type='X')]"],
                                "error: --cfg-options custom_hooks=[dict(type='X')]: the value could not be parsed"),
        'call_with_comma_in_cfg_options': (  # mmengine's parser recurses without end on this one
            'pretrain', [DEMO, '--cfg-options', data, "custom_hooks=[dict(type='X', interval=1)]"],
            "error: --cfg-options custom_hooks=[dict(type='X', interval=1)]: the value could not be parsed"),
    }[case]
    line = _refusal(tool, [*argv, '--work-dir', work], capsys)
    assert line.startswith(expected), line
    assert not work.exists()  # refused before the Runner made the work dir and its log


def test_every_config_shipped_passes_the_keyword_check():
    """No false alarm: every component keyword of the shipped configs (and the tiny test configs built from
    them) exists; norm_cfg's requires_grad and other *_cfg contents are left to their builders."""
    from convmae_backbone import testing
    configs = sorted(p for p in (ROOT / 'configs').rglob('*.py') if p.parent.name != 'detectron2')  # LazyConfigs
    assert len(configs) >= 6
    for path in configs:
        cli.load_config(str(path))
    for cfg in (testing.tiny_det_config('d', 'w'), testing.tiny_seg_config('d', 'w')):
        cli.check_keywords(cfg, 'tiny')
    cfg = cli.load_config(str(SEG))
    cfg.model.decode_head.norm_cfg = dict(type='BN', requires_grad=True, momentum=0.1)
    cli.check_keywords(cfg, 'seg')
    cfg.model.decode_head.chanels = 3
    with pytest.raises(cli.ConfigError, match=r"^seg: model.decode_head.chanels: UPerHead \(model.decode_head\) has "
                                              r"no keyword 'chanels' \(did you mean 'channels'\?\)"):
        cli.check_keywords(cfg, 'seg')
