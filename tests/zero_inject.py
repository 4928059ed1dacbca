"""A hook for the ZeRO tests, imported by a config (custom_imports) in the processes of tools/dist_pretrain.sh."""
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module(force=True)
class InjectNonFiniteWeightHook(Hook):
    """After training iteration ``iteration`` (1-based), put a NaN into a weight on process ``rank`` only (before
    NonFiniteLossHook checks)."""

    priority = 'HIGHEST'

    def __init__(self, iteration: int, rank: int):
        self.iteration, self.rank = iteration, rank

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 == self.iteration and get_rank() == self.rank:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            with torch.no_grad():
                model.decoder_pred.bias[0] = float('nan')
