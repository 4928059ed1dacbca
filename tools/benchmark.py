"""Benchmark ConvMAE (see :mod:`convmae_backbone.benchmark` for what is measured and how).

    PYTHONPATH=. python tools/benchmark.py                  # CPU (and CUDA if present), fp32 and bf16
    PYTHONPATH=. python tools/benchmark.py --quick          # tiny sizes, a smoke run
    PYTHONPATH=. python tools/benchmark.py --official-src ../ConvMAE --compile --rounds 3 --json bench.json
    PYTHONPATH=. python tools/benchmark.py --device cuda --only pretrain   # 128 images per GPU
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout without install
from convmae_backbone.benchmark import main  # noqa: E402

if __name__ == '__main__':
    main()
