"""The ``fastdense`` command (also ``python -m fastdense``), one module per subcommand.

* ``info``         what was built and which backend each op would run on
* ``device-name``  a short file-name-safe tag of this machine's accelerator
                   (names the benchmark JSON: ``bench/results/<tag>.json``)
* ``demo``         ``info``, then every available backend of the multi-task
                   LoRA op checked against the reference and timed against
                   the MTLoRA-style eager loop, then a short training of the
                   tiny multi-task model compared with a constant baseline
* ``train``        train a model on the synthetic scenes (``--help`` lists the options)
* ``eval``         evaluate a training checkpoint and print its metrics
* ``adapt``        few-shot: meta-train (or load) a tiny token matcher, fine-tune it
                   on N shots of the held-out fold's tasks, mean ± std over R support sets
* ``bench``        run the pytest-benchmark suite into ``bench/results/<device-name>.json``

A new command is a module here with a function decorated with
:func:`fastdense.cli._main.command`, imported below: the order of the imports
is the order of ``fastdense --help``, so a command module imports at its top
only the commands listed before it.
"""
from fastdense.cli._main import build_parser, main
from fastdense.cli import info  # noqa: F401  (registers device-name and info)
from fastdense.cli.demo import run_demo
from fastdense.cli.train import run_train
from fastdense.cli.eval import run_eval
from fastdense.cli.adapt import run_adapt
from fastdense.cli import bench  # noqa: F401  (registers bench)
from fastdense.cli._demo_training import run_demo_training

__all__ = ["build_parser", "main", "run_adapt", "run_demo", "run_demo_training", "run_eval", "run_train"]
