"""The demo end to end (short runs): its quiet log, one summary, the labelled reconstruction figure and the
detection / segmentation pictures of a photograph made through mmdet's and mmseg's inferencers."""
import json
import os.path as osp
import re

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_tool

from convmae_backbone import testing
from convmae_backbone.apis.visualization import COLUMNS, UNTRAINED_COLUMN, label_height
from convmae_backbone.engine import reconstruction

demo = load_tool('demo')

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')


def test_demo_end_to_end_small(tmp_path, capfd, monkeypatch):
    for key in (demo.T0_ENV, 'PYTHONWARNINGS', 'OMP_NUM_THREADS'):  # run_demo sets them; restored afterwards
        monkeypatch.setenv(key, '')
        monkeypatch.delenv(key)
    threads = torch.get_num_threads()
    fake = tmp_path / 'fake_finetune.py'
    # stands in for tools/demo_finetune.py: prints a progress line and writes the results file the summary reads
    fake.write_text(
        'import json, os, sys\n'
        'work = sys.argv[sys.argv.index("--work-dir") + 1]\n'
        'os.makedirs(work)\n'
        'print("[demo  0:01] FINETUNE ARGS", sys.argv[1:])\n'
        'files = {"detection": os.path.join(work, "detection.png"), "segmentation": os.path.join(work, "seg.png")}\n'
        'det = {k: 0.5 for k in ("coco/bbox_mAP", "coco/bbox_mAP_50", "coco/segm_mAP", "coco/segm_mAP_50")}\n'
        'seg = {"mIoU": 40.0, "aAcc": 80.0, "mAcc": 50.0}\n'
        'json.dump(dict(det=det, seg=seg, files=files), open(os.path.join(work, "results.json"), "w"))\n')
    out = tmp_path / 'demo'
    try:
        rc = demo.run_demo(str(out), epochs=2, views=3, finetune_script=str(fake))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    printed = capfd.readouterr()
    log = printed.out.splitlines()
    # quiet: our lines only, no mmengine dumps, no warnings; one summary at the end listing every file
    assert all(line.startswith('[demo ') or line.startswith('  ') for line in log), log
    assert 'Config:' not in printed.out and 'System environment' not in printed.out
    assert 'pkg_resources' not in printed.err and 'Warning' not in printed.err, printed.err[-2000:]
    assert sum(line.endswith('] summary') for line in log) == 1
    summary = log[[i for i, line in enumerate(log) if line.endswith('] summary')][0]:]
    backbone, finetune_dir = str(out / 'convmae_demo_backbone.pth'), str(out / 'finetune')
    for path in (out / 'reconstruction.png', out / 'reconstruction_curve.png', backbone,
                 osp.join(finetune_dir, 'detection.png'), osp.join(finetune_dir, 'seg.png')):
        assert any(line.endswith(str(path)) for line in summary), (path, summary)
    curve = [line for line in summary if line.startswith('  reconstruction_curve.png: ')]
    assert len(curve) == 1, summary
    first, last = map(float, re.search(r'norm-pix MSE on the masked patches of 140 held-out crops \(never trained '
                                       r'on\), the same masks every epoch: ([0-9.]+) untrained -> ([0-9.]+) after 2 '
                                       r'epochs \(-?[0-9]+% lower\)', curve[0]).groups())
    scalars = next((out / 'pretrain').rglob('scalars.json'))
    epochs, errors = reconstruction.read_reconstruction_curve(str(scalars))
    assert epochs == [0, 1, 2] and (round(errors[0], 3), round(errors[-1], 3)) == (first, last)
    assert 0.5 < errors[0] < 2  # norm-pix targets have unit variance per patch: an untrained model is near 1
    with Image.open(out / 'reconstruction_curve.png') as png:
        curve_pixels = np.asarray(png.convert('RGB'))
    assert (curve_pixels < 100).any() and (curve_pixels > 250).mean() > 0.5  # drawn on white
    assert any('bbox mAP 0.500' in line for line in summary) and any('mIoU 40.00' in line for line in summary)
    # 42 views, batch 32, drop_last: 1 iteration per epoch
    assert any('pretraining: iteration 2/2 (epoch 2/2), loss ' in line and line.endswith(' s') for line in log)
    assert f"FINETUNE ARGS ['--backbone', {backbone!r}, '--work-dir', {finetune_dir!r}, '--no-summary']" in \
        printed.out

    # the figure: 4 photos at 128 px (8x8 patches), scaled 2x, labelled columns incl. the untrained model
    caption = [line for line in log if 'masked patches: trained' in line][0]
    trained, untrained = map(float, re.search(r'trained ([0-9.]+), untrained \(random init, same masks\) '
                                              r'([0-9]+\.[0-9]+)', caption).groups())
    assert trained > 0 and untrained > 0 and '8x8 patches of 16 px' in caption
    with Image.open(out / 'reconstruction.png') as png:
        width, height = png.size
        pixels = np.asarray(png.convert('RGB'))
    panel = 128 * 2
    assert width == (len(COLUMNS) + 1) * panel and UNTRAINED_COLUMN
    top = label_height(panel)
    assert height > top + 4 * panel  # + the caption band
    band = pixels[:top]
    for col in range(len(COLUMNS) + 1):  # some dark label pixels over each column, on white
        assert (band[:, col * panel:(col + 1) * panel] < 100).any()
    assert (pixels[top + 4 * panel:] < 100).any()  # the caption's text
    state = torch.load(backbone, weights_only=True)
    assert 'blocks3.0.attn.qkv.weight' in state and 'decoder_pred.weight' not in state


def test_finetune_demo_draws_detection_and_segmentation_of_a_photograph(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # the train tools' subprocesses, as in the demo
    from convmae_backbone.apis.export import encoder_state_dict
    from mmengine.config import Config
    from mmengine.registry import MODELS
    torch.manual_seed(0)
    model_cfg = Config.fromfile(testing.DEMO_CONFIG).model
    model_cfg.update(embed_dims=(16, 32, 64), depths=(1, 1, 2), num_heads=2, decoder_depth=1)
    backbone = tmp_path / 'backbone.pth'
    torch.save(encoder_state_dict(MODELS.build(model_cfg).state_dict()), backbone)
    results = demo.finetune_demo(str(backbone), str(tmp_path / 'ft'), num_heads=2, det_epochs=1, seg_iters=3,
                                 summary=True)
    printed = capfd.readouterr().out
    files = results['files']
    with Image.open(files['photo']) as photo:
        width, height = photo.size
    assert width == 480
    for key in ('detection', 'segmentation'):
        assert files[key] == str(tmp_path / 'ft' / f'{key}.png') and files[key] in printed
        with Image.open(files[key]) as png:
            # the inferencer's drawing of the photograph, then of a (square) validation image, under a title
            assert png.width > width + 8 + height // 2 and png.height > height
            pixels = np.asarray(png.convert('RGB'))
        title = png.height - height
        assert (pixels[:title] < 100).any() and (pixels[:title] > 250).mean() > 0.8  # dark text on white
    assert 'Loads checkpoint' not in printed and 'Inference ━' not in printed  # quiet inferencers
    with open(tmp_path / 'ft' / 'results.json') as f:
        assert json.load(f) == results
    assert 0 <= results['det']['coco/bbox_mAP'] <= 1 and 0 <= results['seg']['mIoU'] <= 100
    assert sum('Mask R-CNN (synthetic validation)' in line for line in printed.splitlines()) == 1
