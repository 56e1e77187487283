"""Where a fairseq training update spends its time: forward+backward, optimizer, the rest.

    python -m fairseq_hash.cli.bench.phases DATA_BIN --arch transformer_lm
    python -m fairseq_hash.cli.bench.phases DATA_BIN --arch hash_transformer_lm --hash-experts 64 \
        --optimizer fused_adamw

Builds fairseq's Trainer in this process for a 6-layer, d=512, f=2048 LM
(any fairseq-train flag after DATA_BIN is added or overrides), runs --updates
updates on CPU and prints the median milliseconds per update of each phase,
leaving out the first --skip: ``fwd+bwd`` (the task's train_step), ``optimizer``
(its step), ``clip`` (the gradient norm), ``zero_grad``, and ``update`` (the
whole of Trainer.train_step).
"""
import argparse
import collections
import statistics
import sys
import time

from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

from ..user_dir import user_dir

MODEL = ["--task", "language_modeling", "--decoder-layers", "6", "--decoder-embed-dim", "512",
         "--decoder-ffn-embed-dim", "2048", "--decoder-attention-heads", "8",
         "--tokens-per-sample", "512", "--max-tokens", "2048", "--optimizer", "adam",
         "--lr", "0.0005", "--cpu", "--seed", "1", "--num-workers", "0"]


def timed(obj, name, times, label):
    call = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = call(*args, **kwargs)
        times[label].append(time.perf_counter() - start)
        return out

    setattr(obj, name, wrapper)


def main():
    p = argparse.ArgumentParser(prog="python -m fairseq_hash.cli.bench.phases",
                                description=__doc__.split("\n")[0])
    p.add_argument("data_bin")
    p.add_argument("--updates", type=int, default=14, help="updates to run (default 14)")
    p.add_argument("--skip", type=int, default=4, help="first updates left out (default 4)")
    ours, fairseq_flags = p.parse_known_args()
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        parser, input_args=[ours.data_bin, "--user-dir", user_dir()] + MODEL + fairseq_flags))
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    times = collections.defaultdict(list)
    timed(task, "train_step", times, "fwd+bwd")
    for name, label in (("step", "optimizer"), ("clip_grad_norm", "clip"),
                        ("zero_grad", "zero_grad")):
        timed(trainer.optimizer, name, times, label)
    timed(trainer, "train_step", times, "update")
    batches = trainer.get_train_iterator(epoch=1).next_epoch_itr(shuffle=True)
    for _, sample in zip(range(ours.updates), batches):
        trainer.train_step([sample])
    params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model._name} {' '.join(fairseq_flags)}: {params:,} parameters; median ms: "
          + ", ".join(f"{k} {1e3 * statistics.median(v[ours.skip:]):.0f}"
                      for k, v in times.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
