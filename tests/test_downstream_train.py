"""End to end: a few fine-tuning iterations plus evaluation through mmdet's and mmseg's own train tools, on
tiny synthetic datasets, with a small ConvMAE loaded from a pretraining checkpoint; then this project's
tools/test.py on the results, the detector checkpoint loaded back into a backbone, and a SIGKILLed segmentation
run resumed to the weights of an uninterrupted one."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from convmae_backbone import ConvMAE, ConvMAEPretrainer, testing
from convmae_backbone.checkpoint import safe_torch_load

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A tiny ConvMAE pretraining checkpoint in mmengine's format (encoder + decoder weights)."""
    torch.manual_seed(0)
    model = ConvMAEPretrainer(**testing.TINY_BACKBONE, **testing.TINY_DECODER)
    model.init_weights()
    path = str(tmp_path_factory.mktemp('pretrain') / 'pretrain.pth')
    torch.save(dict(meta=dict(epoch=1), state_dict=model.state_dict()), path)
    return path, model.state_dict()


def _run_test_tool(config, checkpoint, work_dir, *extra):
    os.makedirs(work_dir, exist_ok=True)
    cmd = [sys.executable, osp.join(REPO, 'tools', 'test.py'), config, checkpoint, '--work-dir', work_dir, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=work_dir)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_mask_rcnn_finetune_eval_and_checkpoint_roundtrip(tmp_path, pretrained):
    ckpt, pre_state = pretrained
    data = testing.write_coco_dataset(str(tmp_path / 'coco'), num_train=4, num_val=2, size=(96, 96))
    work = str(tmp_path / 'work')
    os.makedirs(work)
    # The config names a missing file; the command line supplies the real one, as documented in the config.
    cfg = testing.tiny_det_config(data, work, testing.TINY_BACKBONE, checkpoint='/nonexistent/backbone.pth',
                                  image_size=96, max_epochs=1)
    config = osp.join(work, 'mask_rcnn_tiny.py')
    cfg.dump(config)
    log = _ok(testing.run_train_tool('mmdet', config, work,
                                  ['--cfg-options', f'model.backbone.init_cfg.checkpoint={ckpt}']))
    assert f'ConvMAE weights from {ckpt}' in log
    metrics = testing.read_val_metrics(work)
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)

    # The fine-tuned detector's backbone loads back into a ConvMAE through init_cfg.
    det_ckpt = osp.join(work, 'epoch_1.pth')
    det_state = safe_torch_load(det_ckpt)['state_dict']
    backbone = ConvMAE(**testing.TINY_BACKBONE, out_indices=(0, 1, 2, 3),
                       init_cfg=dict(type='Pretrained', checkpoint=det_ckpt))
    backbone.init_weights()
    key = 'blocks3.1.attn.qkv.weight'
    assert torch.equal(backbone.state_dict()[key], det_state['backbone.' + key])
    assert torch.equal(backbone.pos_embed, det_state['backbone.pos_embed'])
    # ... and those are fine-tuned weights: they moved away from the pretraining ones.
    assert not torch.equal(det_state['backbone.' + key], pre_state[key])
    assert (det_state['backbone.' + key] - pre_state[key]).abs().max() < 0.05

    # This project's tools/test.py evaluates the checkpoint with the same config.
    test_log = _ok(_run_test_tool(config, det_ckpt, str(tmp_path / 'test'), '--out',
                                  str(tmp_path / 'det.pkl')))
    assert 'coco/segm_mAP' in test_log and osp.isfile(tmp_path / 'det.pkl')


def test_upernet_finetune_eval_with_layer_decay(tmp_path, pretrained):
    ckpt, pre_state = pretrained
    data = testing.write_ade_dataset(str(tmp_path / 'ade'), num_train=4, num_val=2, size=(80, 96))
    work = str(tmp_path / 'work')
    os.makedirs(work)
    cfg = testing.tiny_seg_config(data, work, testing.TINY_BACKBONE, checkpoint=ckpt, max_iters=4)
    config = osp.join(work, 'upernet_tiny.py')
    cfg.dump(config)
    log = _ok(testing.run_train_tool('mmseg', config, work))
    assert f'ConvMAE weights from {ckpt}' in log
    metrics = testing.read_val_metrics(work)
    for key in ('mIoU', 'aAcc', 'mAcc'):
        assert 0.0 <= metrics[key] <= 100.0, (key, metrics)

    # The optimizer that mmseg's runner built used the layer-decay constructor: 2 stage-3 blocks, rate 0.75.
    state = safe_torch_load(osp.join(work, 'iter_4.pth'))
    groups = state['optimizer']['param_groups']
    by_layer = {g['layer_id']: g for g in groups}
    assert sorted(by_layer) == [0, 1, 2, 3]
    # (the schedule has run to its end, lr 0; the schedulers keep each group's starting lr as initial_lr)
    assert by_layer[3]['initial_lr'] == cfg.optim_wrapper.optimizer.lr
    for layer_id, g in by_layer.items():
        assert g['initial_lr'] == pytest.approx(by_layer[3]['initial_lr'] * 0.75 ** (3 - layer_id), rel=1e-6)
    assert {g['weight_decay'] for g in groups} == {0.0, 0.05}
    assert not torch.equal(state['state_dict']['backbone.blocks3.0.mlp.fc1.weight'],
                           pre_state['blocks3.0.mlp.fc1.weight'])

    out_dir = str(tmp_path / 'pred')
    test_log = _ok(_run_test_tool(config, osp.join(work, 'iter_4.pth'), str(tmp_path / 'test'), '--out', out_dir))
    assert 'mIoU' in test_log
    assert len(os.listdir(out_dir)) == 2  # one predicted mask per validation image


def _tiny_seg_resume_config(tmp_path, data, work):
    cfg = testing.tiny_seg_config(data, work, testing.TINY_BACKBONE, checkpoint=None, max_iters=6)
    # Deterministic: no dropout (its torch RNG draws are not replayed on resume), no validation.
    cfg.model.decode_head.dropout_ratio = 0.0
    cfg.model.auxiliary_head.dropout_ratio = 0.0
    cfg.randomness = dict(seed=3, deterministic=True)
    cfg.default_hooks.checkpoint.interval = 2
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    path = str(tmp_path / 'upernet_resume.py')
    cfg.dump(path)
    return path


def test_upernet_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
    """mmseg's train tool, killed (SIGKILL) after a checkpoint and resumed with --resume, ends with exactly the
    weights of an uninterrupted run (made with this project's tools/train.py)."""
    data = testing.write_ade_dataset(str(tmp_path / 'ade'), num_train=4, num_val=1, size=(80, 96))
    full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
    os.makedirs(full)
    os.makedirs(killed)
    config = _tiny_seg_resume_config(tmp_path, data, full)
    # The uninterrupted reference run goes through this project's tools/train.py (same runner, same result).
    _ok(subprocess.run([sys.executable, osp.join(REPO, 'tools', 'train.py'), config, '--work-dir', full],
                       capture_output=True, text=True, timeout=300, cwd=full))

    # Start the same run and kill it as soon as its first checkpoint (iteration 2 of 6) is complete.
    import importlib
    import signal
    import time
    tool = osp.join(osp.dirname(importlib.import_module('mmseg').__file__), '.mim', 'tools', 'train.py')
    proc = subprocess.Popen([sys.executable, tool, config, '--work-dir', killed], cwd=killed,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = osp.join(killed, 'last_checkpoint')  # written after the checkpoint file is complete
    deadline = time.time() + 240
    while not osp.isfile(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    assert not osp.isfile(osp.join(killed, 'iter_6.pth'))
    at_kill = safe_torch_load(open(marker).read().strip())
    interrupted_at = at_kill['meta']['iter']
    assert 2 <= interrupted_at < 6

    log = _ok(testing.run_train_tool('mmseg', config, killed, ['--resume']))
    assert f'resumed epoch: 0, iter: {interrupted_at}' in log
    resumed = safe_torch_load(osp.join(killed, 'iter_6.pth'))
    reference = safe_torch_load(osp.join(full, 'iter_6.pth'))
    assert resumed['meta']['iter'] == reference['meta']['iter'] == 6
    assert resumed['state_dict'].keys() == reference['state_dict'].keys()
    for key, value in reference['state_dict'].items():
        assert torch.equal(resumed['state_dict'][key], value), key
    # ... and the resumed part of the run did train (the weights moved after the kill)
    for key in ('decode_head.conv_seg.weight', 'backbone.blocks3.1.attn.qkv.weight'):
        assert not torch.equal(at_kill['state_dict'][key], reference['state_dict'][key]), key
