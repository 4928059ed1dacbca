from .amp import BF16OptimWrapper
from .distributed import CPUSyncBatchNorm, DeviceAwareDistributedDataParallel
from .flops import register_flop_handles
from .hooks import AtomicCheckpointHook, NonFiniteLossHook, PlainParamGroupsHook, ReseedHook
from .knn import KNNMonitorHook
from .optim import ConvMAELayerDecayOptimWrapperConstructor
from .reconstruction import ReconstructionMonitorHook

__all__ = ['BF16OptimWrapper', 'CPUSyncBatchNorm', 'DeviceAwareDistributedDataParallel', 'AtomicCheckpointHook',
           'NonFiniteLossHook', 'PlainParamGroupsHook', 'ReseedHook', 'KNNMonitorHook', 'ReconstructionMonitorHook',
           'ConvMAELayerDecayOptimWrapperConstructor', 'register_flop_handles']
