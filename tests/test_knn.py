"""The online k-NN monitor: DINO's weighted voting on hand-made features, the feature gathering across ranks
(one process and two gloo processes), and the hook inside a tiny pretraining run through tools/pretrain.py."""
import json
import logging
import math
import os
import os.path as osp
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from mmengine.hooks import Hook
from PIL import Image

import convmae_backbone  # noqa: F401
from convmae_backbone.engine.knn import (KNNMonitorHook, gather_features, knn_scores, list_labelled_images,
                                  plot_knn_curve, read_knn_curve, topk_accuracy)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=1)


def test_weighted_vote_beats_majority():
    """Query 0 has two class-0 neighbours at cosine 0.5 and one class-1 neighbour at 0.9: a majority vote
    says 0, DINO's exp(sim / T) weights say 1. Scores equal the formula."""
    a = math.acos(0.9)
    b = math.acos(0.5)
    bank = _unit([math.cos(a), math.sin(a), 0.0],    # class 1, cos 0.9 to e0
                 [math.cos(b), 0.0, math.sin(b)],    # class 0, cos 0.5
                 [math.cos(b), 0.0, -math.sin(b)],   # class 0, cos 0.5
                 [-1.0, 0.0, 0.0],                   # class 2, cos -1: outside the k = 3 nearest
                 [0.0, 0.0, 1.0])                    # class 2, cos 0
    labels = torch.tensor([1, 0, 0, 2, 2])
    queries = _unit([1.0, 0.0, 0.0], [0.0, 0.0, 1.0])
    scores = knn_scores(bank, labels, queries, num_classes=3, k=3, temperature=0.07)
    w = lambda s: math.exp(s / 0.07)  # noqa: E731
    expected0 = [2 * w(0.5), w(0.9), 0.0]
    torch.testing.assert_close(scores[0], torch.tensor(expected0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert scores[0].argmax().item() == 1
    # query 1 = e2: nearest are bank[4] (cos 1, class 2), bank[1] (cos sin b, class 0), then bank[0] (cos 0)
    # and bank[3] (cos 0) tie for the third place; whichever is taken, class 2 wins.
    assert scores[1].argmax().item() == 2
    # a temperature so high that the weights flatten: the majority (class 0) wins query 0
    flat = knn_scores(bank, labels, queries, num_classes=3, k=3, temperature=1e6)
    assert flat[0].argmax().item() == 0
    acc = topk_accuracy(scores, torch.tensor([1, 0]), topk=(1, 5))
    assert acc[1] == 50.0 and acc[5] == 100.0  # top-5 capped at the 3 classes
    # k larger than the bank: every bank entry votes
    every = knn_scores(bank, labels, queries[:1], num_classes=3, k=100, temperature=0.07)
    assert every[0, 2].item() == pytest.approx(w(-1.0) + w(0.0), rel=1e-12)


def test_gather_features_single_process_reorders_and_checks_cover():
    feats = torch.arange(12, dtype=torch.float32).view(6, 2)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out = gather_features(feats[perm], perm, 6)
    assert torch.equal(out, feats)
    with pytest.raises(RuntimeError, match='cover the dataset exactly once'):
        gather_features(feats[:5], torch.arange(5), 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_folder(root, classes=3, per_class=(5, 3), size=40, seed=0):
    """ImageNet-style folder: <root>/{train,val}/<class>/*.png; each class has its own colour and stripes."""
    g = torch.Generator().manual_seed(seed)
    for split, n in zip(('train', 'val'), per_class):
        for c in range(classes):
            os.makedirs(osp.join(root, split, f'class{c}'), exist_ok=True)
            for i in range(n):
                img = torch.rand(size, size, 3, generator=g) * 60
                img[..., c] += 150
                img[:, (c + 1) * 4::12] += 40
                Image.fromarray(img.clamp(0, 255).byte().numpy()).save(osp.join(root, split, f'class{c}', f'{i}.png'))
    return root


class _FakeVisualizer:
    def __init__(self):
        self.logged = []

    def add_scalars(self, scalars, step):
        self.logged.append((dict(scalars), step))


def _tiny_pretrainer():
    from convmae_backbone import ConvMAEPretrainer
    torch.manual_seed(0)
    return ConvMAEPretrainer(img_size=32, embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=4,
                             decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                             data_preprocessor=dict(type='ImgDataPreprocessor', mean=[123.675, 116.28, 103.53],
                                                    std=[58.395, 57.12, 57.375]))


def _fake_runner(model):
    from types import SimpleNamespace

    from mmengine.logging import MessageHub
    return SimpleNamespace(model=model, epoch=0, cfg={}, visualizer=_FakeVisualizer(),
                           message_hub=MessageHub.get_instance('knn_test'))


def _dist_worker(rank, world, port, root, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch_dist.init_process_group('gloo', rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # gather: rank r holds rows r, r + world, ... of a 7-row table (shards of different sizes)
        table = torch.arange(21, dtype=torch.float32).view(7, 3)
        index = torch.arange(rank, 7, world)
        gathered = gather_features(table[index], index, 7)
        # the hook end to end: each rank embeds its share of both splits
        hook = KNNMonitorHook(data_root=root, k=4, batch_size=2)
        result = hook.evaluate(_fake_runner(_tiny_pretrainer()), step=0)
        torch.save(dict(gathered=gathered, result=result), osp.join(out_dir, f'rank{rank}.pt'))
    finally:
        torch_dist.destroy_process_group()


def test_hook_under_two_gloo_processes_equals_one_process(tmp_path):
    root = _write_folder(str(tmp_path / 'data'))
    single = KNNMonitorHook(data_root=root, k=4, batch_size=2)
    runner = _fake_runner(_tiny_pretrainer())
    expected = single.evaluate(runner, step=0)
    assert runner.visualizer.logged == [(expected, 0)]
    assert runner.message_hub.get_scalar('knn/top1').current() == expected['knn/top1']

    mp.start_processes(_dist_worker, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, join=True,
                       start_method='fork')
    for rank in range(2):
        out = torch.load(tmp_path / f'rank{rank}.pt', weights_only=True)
        assert torch.equal(out['gathered'], torch.arange(21, dtype=torch.float32).view(7, 3))
        assert out['result'] == pytest.approx(expected, abs=1e-9)


def test_hook_features_are_the_encoder_stage3_mean(tmp_path):
    """The hook's bank features are the L2-normalised mean of forward_features' stage-3 map of the eval view."""
    from convmae_backbone.engine.knn import encoder_features, load_eval_image
    root = _write_folder(str(tmp_path / 'data'), per_class=(2, 1))
    model = _tiny_pretrainer().eval()
    paths, labels, classes = list_labelled_images(osp.join(root, 'train'))
    assert classes == ['class0', 'class1', 'class2'] and labels == [0, 0, 1, 1, 2, 2]
    img = load_eval_image(paths[0], 32)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    x = model.data_preprocessor(dict(inputs=[img]), False)['inputs']
    with torch.no_grad():
        f = encoder_features(model, x)
        s3 = model.forward_features(x)[2]
    ref = s3.mean(dim=(2, 3))
    torch.testing.assert_close(f, ref / ref.norm(dim=1, keepdim=True))
    assert f.shape == (1, 48)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        list_labelled_images(str(tmp_path / 'missing'))
    os.makedirs(tmp_path / 'flat')
    Image.new('RGB', (8, 8)).save(tmp_path / 'flat' / 'a.png')
    with pytest.raises(FileNotFoundError, match='no class sub-folders'):
        list_labelled_images(str(tmp_path / 'flat'))
    root = _write_folder(str(tmp_path / 'data'), per_class=(1, 1))
    os.makedirs(osp.join(root, 'val', 'extra'))
    Image.new('RGB', (8, 8)).save(osp.join(root, 'val', 'extra', 'x.png'))
    hook = KNNMonitorHook(data_root=root)
    with pytest.raises(ValueError, match='different classes'):
        hook.evaluate(_fake_runner(_tiny_pretrainer()), step=0)
    with pytest.raises(ValueError, match='interval'):
        KNNMonitorHook(data_root=root, interval=0)


def test_hook_in_tiny_demo_pretraining_logs_knn_and_draws_curve(tmp_path):
    """tools/pretrain.py on the demo config with a KNNMonitorHook (following the training data root): k-NN
    accuracy logged before training and after the last epoch (3), then drawn as a PNG."""
    from convmae_backbone.testing import write_demo_images
    images = str(tmp_path / 'images')
    write_demo_images(images, views_per_photo=3, size=64, seed=0, val_views_per_photo=2)
    work = str(tmp_path / 'work')
    config = tmp_path / 'demo_knn.py'
    config.write_text(f"_base_ = [{osp.join(REPO, 'configs', 'pretrain', 'convmae-tiny_demo.py')!r}]\n"
                      "custom_hooks = [dict(type='KNNMonitorHook', interval=4)]\n")
    cmd = [sys.executable, osp.join(REPO, 'tools', 'pretrain.py'), str(config),
           '--work-dir', work, '--cfg-options', f'train_dataloader.dataset.data_root={images}',
           'train_cfg.max_epochs=3', 'train_dataloader.batch_size=14', 'model.depths=[1,1,1]',
           'model.decoder_depth=1']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert '42 in the bank' in log and '28 queries' in log and '14 classes' in log
    runs = [d for d in os.listdir(work) if osp.isfile(osp.join(work, d, 'vis_data', 'scalars.json'))]
    scalars = osp.join(work, runs[0], 'vis_data', 'scalars.json')
    epochs, top1 = read_knn_curve(scalars)
    assert epochs == [0, 3]  # the demo config: interval 4, plus the last epoch
    assert all(0.0 <= v <= 100.0 for v in top1)
    _, top5 = read_knn_curve(scalars, 'knn/top5')
    assert all(t5 >= t1 for t1, t5 in zip(top1, top5))
    png = plot_knn_curve(scalars, str(tmp_path / 'knn.png'))
    with Image.open(png) as img:
        assert img.format == 'PNG' and img.size[0] > 300
    with open(scalars) as f:
        assert any('knn/top1' in json.loads(line) for line in f)


def test_hook_on_a_classifier_uses_its_backbone_and_rgb_normalisation(tmp_path):
    """An mmpretrain classifier (ConvMAE at .backbone, a BGR->RGB data preprocessor) gives the same k-NN
    features as the pretrainer holding the same encoder weights: images go in RGB with the model's mean/std."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    root = _write_folder(str(tmp_path / 'data'), per_class=(2, 1))
    pretrainer = _tiny_pretrainer().eval()
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='ConvMAE', img_size=32, embed_dims=(16, 32, 48), depths=(1, 1, 1), num_heads=4,
                          out_type='avg_featmap'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=48),
            data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)))
    missing = classifier.backbone.load_state_dict(pretrainer.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ['fc_norm.bias', 'fc_norm.weight']
    hook = KNNMonitorHook(data_root=root)
    paths = list_labelled_images(osp.join(root, 'train'))[0]
    with torch.no_grad():
        ref = hook._embed(pretrainer, pretrainer, paths, 32)
        ours = hook._embed(classifier, classifier.backbone, paths, 32)
    torch.testing.assert_close(ours, ref)
    result = hook.evaluate(_fake_runner(classifier), step=0)
    assert result == hook.evaluate(_fake_runner(pretrainer), step=0)


def _write_corrupt(path):
    """A file with an image extension that no decoder reads."""
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 8)


def test_unreadable_images_are_left_out_with_a_warning_naming_them(tmp_path, monkeypatch):
    from convmae_backbone.engine import knn
    root = _write_folder(str(tmp_path / 'data'))
    clean = KNNMonitorHook(data_root=root, k=4, batch_size=2).evaluate(_fake_runner(_tiny_pretrainer()), step=0)
    bad_query = osp.join(root, 'val', 'class1', 'zz_bad.png')
    bad_bank = osp.join(root, 'train', 'class0', 'zz_bad.png')
    _write_corrupt(bad_query)
    _write_corrupt(bad_bank)
    logged = []
    monkeypatch.setattr(knn, 'print_log', lambda msg, **kw: logged.append((kw.get('level'), msg)))
    result = KNNMonitorHook(data_root=root, k=4, batch_size=2).evaluate(_fake_runner(_tiny_pretrainer()), step=0)
    assert result == pytest.approx(clean, abs=1e-9)  # the bad files sort last: the same images are classified
    warnings = [m for level, m in logged if level == logging.WARNING]
    assert len(warnings) == 2 and all('skipped unreadable image' in m for m in warnings)
    assert any(bad_query in m for m in warnings) and any(bad_bank in m for m in warnings)
    assert '9 queries, 15 in the bank, 3 classes, 2 unreadable images left out' in logged[-1][1]


def test_a_failure_inside_the_hook_is_logged_and_the_run_goes_on(tmp_path, monkeypatch):
    from convmae_backbone.engine import knn
    root = _write_folder(str(tmp_path / 'data'), per_class=(1, 1))
    logged = []
    monkeypatch.setattr(knn, 'print_log', lambda msg, **kw: logged.append((kw.get('level'), msg)))

    def broken(encoder, images):
        raise RuntimeError('out of memory (simulated)')

    monkeypatch.setattr(knn, 'encoder_features', broken)
    runner = _fake_runner(_tiny_pretrainer())
    runner.max_epochs = 1
    hook = KNNMonitorHook(data_root=root)
    hook.before_train(runner)  # the evaluation at start fails: logged
    hook.after_train_epoch(runner)  # so does the one after the last epoch
    errors = [m for level, m in logged if level == logging.ERROR]
    assert errors == [f'k-NN monitor failed after epoch {e} (RuntimeError: out of memory (simulated)); training '
                      'goes on' for e in (0, 1)]
    assert runner.visualizer.logged == []
    with pytest.raises(RuntimeError, match='simulated'):  # called directly, evaluate() raises
        hook.evaluate(runner, step=1)


def _failing_rank_worker(rank, world, port, root, out_dir):
    """Rank 1's encoder fails: both ranks must return from the hook (nobody waits in all_gather) and stay in
    step for the next evaluation."""
    from datetime import timedelta

    from convmae_backbone.engine import knn
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch_dist.init_process_group('gloo', rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.set_num_threads(1)
        logged = []
        knn.print_log = lambda msg, **kw: logged.append(msg)  # this child process only
        real = knn.encoder_features
        if rank == 1:
            def broken(encoder, images):
                raise RuntimeError('encoder failed on rank 1')
            knn.encoder_features = broken
        hook = KNNMonitorHook(data_root=root, k=4, batch_size=2)
        runner = _fake_runner(_tiny_pretrainer())
        runner.max_epochs = 1
        hook.after_train_epoch(runner)
        knn.encoder_features = real
        after = hook.evaluate(runner, step=2)
        torch.save(dict(logged=logged, visual=runner.visualizer.logged, after=after),
                   osp.join(out_dir, f'fail{rank}.pt'))
    finally:
        torch_dist.destroy_process_group()


def test_a_failure_on_one_rank_neither_hangs_nor_ends_the_others(tmp_path):
    root = _write_folder(str(tmp_path / 'data'))
    expected = KNNMonitorHook(data_root=root, k=4, batch_size=2).evaluate(_fake_runner(_tiny_pretrainer()), step=0)
    mp.start_processes(_failing_rank_worker, args=(2, _free_port(), root, str(tmp_path)), nprocs=2, join=True,
                       start_method='fork')
    outs = [torch.load(tmp_path / f'fail{rank}.pt', weights_only=False) for rank in range(2)]
    assert ('k-NN monitor failed after epoch 1 (RuntimeError: k-NN evaluation failed on another process (see its '
            'log)); training goes on') in outs[0]['logged']
    assert ('k-NN monitor failed after epoch 1 (RuntimeError: encoder failed on rank 1); training goes on'
            in outs[1]['logged'])
    for out in outs:
        assert out['visual'] == [(out['after'], 2)]  # only the evaluation that worked was logged
        assert out['after'] == pytest.approx(expected, abs=1e-9)


def test_hook_runs_after_the_checkpoint_hook_of_the_pretraining_config(tmp_path):
    """The Runner built from the pretraining config with the k-NN monitor: the epoch checkpoint is written
    before the monitor runs (a failure in it cannot cost the checkpoint)."""
    from helpers import BASE_CFG, TINY_ARCH

    from convmae_backbone.apis import cli
    cfg = cli.load_config(str(BASE_CFG), work_dir=str(tmp_path / 'work'))
    cfg.model.update(img_size=32, **TINY_ARCH)
    cfg.custom_hooks.append(dict(type='KNNMonitorHook', data_root=str(tmp_path)))
    runner = cli.build_runner(cfg)
    after_epoch = [type(h).__name__ for h in runner.hooks  # runner.hooks: the order they are called in
                   if type(h).after_train_epoch is not Hook.after_train_epoch]
    assert after_epoch.index('AtomicCheckpointHook') < after_epoch.index('KNNMonitorHook') == len(after_epoch) - 1


def test_corrupt_image_in_the_knn_folder_keeps_the_epoch_checkpoint(tmp_path):
    """A tiny pretraining run (tools/pretrain.py) whose k-NN folder holds a corrupt image: warned about, the
    epoch's checkpoint is written, the run exits 0."""
    from helpers import make_images, write_tiny_config
    knn_root = _write_folder(str(tmp_path / 'knn'), per_class=(2, 1), size=36)
    _write_corrupt(osp.join(knn_root, 'val', 'class2', 'broken.jpg'))
    hooks = ("custom_hooks = [dict(type='NonFiniteLossHook', max_rollbacks=3), dict(type='ReseedHook'), "
             f"dict(type='KNNMonitorHook', data_root={knn_root!r}, interval=1, batch_size=4, at_start=False)]\n")
    cfg = write_tiny_config(tmp_path / 'tiny_knn.py', make_images(tmp_path / 'data'), max_epochs=2, extra=hooks)
    work = tmp_path / 'work'
    proc = subprocess.run([sys.executable, osp.join(REPO, 'tools', 'pretrain.py'), str(cfg), '--work-dir', str(work)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (work / 'epoch_1.pth').is_file() and (work / 'epoch_2.pth').is_file()
    assert f"skipped unreadable image {osp.join(knn_root, 'val', 'class2', 'broken.jpg')!r}" in log
    assert '3 queries, 6 in the bank, 3 classes, 1 unreadable images left out' in log
