"""``python -m fairseq_hash.cli.bench.offload``: serving with experts offloaded, against all resident.

    python -m fairseq_hash.cli.bench.offload                       # the table and the plot
    python -m fairseq_hash.cli.bench.offload --experts 16 --embed-dim 128 --quick
    python -m fairseq_hash.cli.bench.offload --threads 1 --repeat 3 --json X.json --plot X.png

Builds a hash LM whose experts are large against the machine (default 2 hash
layers of 64 experts, d=512, f=2048: 1 GB of experts in fp32) and a Switch LM
of the same shape (untrained: speed does not depend on the weights), writes
their checkpoints, and runs, each in a fresh process:

- ``fairseq-eval-lm`` on a test split (tokens/s, fairseq's own timer), and
- beam-5 generation through the hub interface (sentences/s),

for: all resident; hash, offloaded on demand; hash, offloaded with exact
prefetch; Switch, offloaded on demand. Each with the page cache warm (the
checkpoint read once before) and cold: the checkpoint's pages evicted first
and after every expert read (``os.posix_fadvise(..., POSIX_FADV_DONTNEED)``),
as when the expert file does not fit in memory. It prints the process's peak
resident memory while serving (reset after loading: fairseq reads the whole
checkpoint once to load it), the cache's peak and the bytes read from the
expert file; then tokens/s against the cache size, and plots it (``--plot``).
Every row also gives the machine's load average (1 minute) before and after
it: on a shared machine the speeds mean little without it.
"""
import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROWS = [("all resident", "hash", "none"), ("hash, on demand", "hash", "demand"),
        ("hash, exact prefetch", "hash", "prefetch"), ("switch, on demand", "switch", "demand")]


def save_untrained_checkpoint(path: str, argv):
    """A fairseq checkpoint of a model built (not trained) from training flags ``argv``."""
    import fairseq_hash  # noqa: F401  (registers the models)
    from fairseq import checkpoint_utils, options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), list(map(str, argv)))
    torch.manual_seed(args.seed)
    model = tasks.setup_task(args).build_model(args)
    for p in model.parameters():  # routers and gates start at zero: make them choose
        if p.dim() > 1 and not p.abs().sum():
            torch.nn.init.normal_(p)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpoint_utils.torch_persistent_save(
        {"cfg": convert_namespace_to_omegaconf(args), "model": model.state_dict(), "args": None,
         "optimizer_history": [{"criterion_name": "CrossEntropyCriterion",
                                "optimizer_name": "Adam", "lr_scheduler_state": {},
                                "num_updates": 0}],
         "extra_state": {}}, path)
    return path


def write_data(folder, lines=1200, vocab=2000, seed=0, test=None):
    """Zipf-distributed sentences, preprocessed for language_modeling into ``folder/data-bin``."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(vocab)]
    raw = os.path.join(folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in (("train", lines), ("valid", lines // 10), ("test", test or lines // 4)):
        with open(os.path.join(raw, f"{split}.txt"), "w") as f:
            for _ in range(n):
                words = rng.choices(range(vocab), weights, k=rng.randint(8, 30))
                f.write(" ".join(f"w{i}" for i in words) + "\n")
    dest = os.path.join(folder, "data-bin")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "fairseq-preprocess"),
                    "--only-source", "--task", "language_modeling", "--workers", "1",
                    "--destdir", dest, *[a for split in ("train", "valid", "test")
                                         for a in (f"--{split}pref", f"{raw}/{split}.txt")]],
                   check=True, capture_output=True)
    return dest


def model_flags(data, opts, router):
    layers = ",".join(str(i) for i in range(1, opts.layers, max(1, opts.layers // opts.hash_layers)))
    return [data, "--task", "language_modeling", "--arch", "hash_transformer_lm",
            "--decoder-layers", opts.layers, "--decoder-embed-dim", opts.embed_dim,
            "--decoder-ffn-embed-dim", opts.ffn_dim, "--decoder-attention-heads", 8,
            "--hash-experts", opts.experts, "--hash-layer", layers, "--hash-type", "balanced",
            "--router", router, "--tokens-per-sample", 256, "--dropout", 0, "--cpu", "--seed", 1]


# --- one measurement, in a fresh process --------------------------------------------------

def _status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":")) * 1024


def _read_bytes():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("read_bytes:"))


class _Serving:
    """Peak memory and disk reads from here on (the peak of loading forgotten);
    ``cold``: the file's pages, which loading read, evicted first."""

    def __init__(self, cold_file=None):
        self.cold_file = cold_file

    def __enter__(self):
        if self.cold_file:
            from fairseq_hash.offload import drop_page_cache

            drop_page_cache(self.cold_file)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (Linux)
        self.read = _read_bytes()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.peak_rss = _status("VmHWM")
        self.disk_read = _read_bytes() - self.read


def child(opts):
    """One run: print a JSON line of its numbers."""
    import fairseq_hash  # noqa: F401
    from fairseq_hash.offload import ExpertSource, drop_page_cache, offload_stats

    overrides = {}
    if opts.offload != "none":
        overrides = {"hash_offload_experts": opts.offload, "hash_expert_cache": opts.cache}
    cold = opts.checkpoint if opts.cold else None
    if opts.cold:
        drop_page_cache(opts.checkpoint)
        ExpertSource.uncached = True
    result = {}
    if opts.task == "eval":
        import fairseq_cli.eval_lm as eval_lm

        # as in fairseq-eval-lm, where the plugin is imported after this module
        fairseq_hash.install_eval_lm_lookahead()
        plain, measured = eval_lm.eval_lm, {}

        def timed(*args, **kwargs):
            with _Serving(cold) as serving:
                out = plain(*args, **kwargs)
            measured["serving"] = serving
            return out

        class Rate(logging.Handler):
            def emit(self, record):
                text = record.getMessage()
                if text.startswith("Evaluated "):
                    result["tokens_per_s"] = float(text.split("(")[1].split()[0])

        logging.getLogger("fairseq_cli.eval_lm").addHandler(Rate())
        eval_lm.eval_lm = timed
        sys.argv = ["fairseq-eval-lm", opts.data, "--path", opts.checkpoint, "--cpu",
                    "--user-dir", os.path.dirname(fairseq_hash.__file__), "--max-tokens", "2048",
                    "--tokens-per-sample", "256", "--model-overrides", repr(overrides)]
        eval_lm.cli_main()
        serving = measured["serving"]
    else:
        from fairseq.models.transformer_lm import TransformerLanguageModel

        hub = TransformerLanguageModel.from_pretrained(
            os.path.dirname(opts.checkpoint), os.path.basename(opts.checkpoint), opts.data,
            **overrides).eval()
        with open(os.path.join(os.path.dirname(opts.data), "raw", "test.txt")) as f:
            prompts = [" ".join(line.split()[:6]) for line in f][: opts.sentences]
        with _Serving(cold) as serving:
            hub.sample(prompts, beam=5, max_len_b=12)
        result["sentences_per_s"] = len(prompts) / serving.seconds
    stats = offload_stats()
    result.update(peak_rss_mb=serving.peak_rss / 2**20, disk_read_mb=serving.disk_read / 2**20,
                  expert_read_mb=stats.get("bytes_read", 0) / 2**20,
                  cache_peak_mb=stats.get("peak_bytes", 0) / 2**20)
    print("RESULT " + json.dumps(result), flush=True)


def measure(opts, checkpoint, data, task, offload, cache, cold):
    """One row's numbers: the median speed of ``--repeat`` fresh processes."""
    runs = []
    for _ in range(opts.repeat):
        before = os.getloadavg()[0]
        runs.append(measure_once(opts, checkpoint, data, task, offload, cache, cold))
        runs[-1]["load"] = [before, os.getloadavg()[0]]
    speed = "tokens_per_s" if task == "eval" else "sentences_per_s"
    median = statistics.median_low([r[speed] for r in runs])
    out = dict(next(r for r in runs if r[speed] == median))
    out.update(runs=runs, load=[runs[0]["load"][0], runs[-1]["load"][1]])
    return out


def measure_once(opts, checkpoint, data, task, offload, cache, cold):
    cmd = [sys.executable, "-m", "fairseq_hash.cli.bench.offload", "--child", task,
           "--checkpoint", checkpoint, "--data", data, "--offload", offload, "--cache", str(cache),
           "--sentences", str(opts.sentences)] + (["--cold"] if cold else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(opts.threads),
               MKL_NUM_THREADS=str(opts.threads))
    if not cold:  # warm: the checkpoint's pages are in the page cache
        with open(checkpoint, "rb") as f:
            while f.read(64 << 20):
                pass
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fairseq_hash.cli.bench.offload",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64, help="experts a hash layer (default 64)")
    parser.add_argument("--hash-layers", type=int, default=2, help="hash layers (default 2)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--embed-dim", type=int, default=512, help="d (default 512)")
    parser.add_argument("--ffn-dim", type=int, default=2048, help="f of every expert (default 2048)")
    parser.add_argument("--cache", default="64",
                        help="--hash-expert-cache of the table's rows (default 64: half the experts)")
    parser.add_argument("--sweep", nargs="*", default=["16", "32", "64", "128"],
                        help="cache sizes of the speed-against-cache rows (cold eval; none: skip)")
    parser.add_argument("--test-sentences", type=int, default=300,
                        help="sentences of the test split eval-lm scores (default 300: about "
                        "5,800 tokens, 3 batches); more batches amortise the first batch, "
                        "whose first hash layer's experts nothing can load ahead of")
    parser.add_argument("--sentences", type=int, default=8,
                        help="prompts of the beam-5 generation (default 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of every run (OMP_NUM_THREADS; default "
                        f"{torch.get_num_threads()}); on a loaded machine 1 keeps the rows "
                        "comparable: a product on 2 threads waits for the slower one")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh processes a row; the table gives the median speed (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="the table only: no beam-5 generation, no cache sweep")
    parser.add_argument("--workdir", help="folder for data and checkpoints (default: a temporary one)")
    parser.add_argument("--json", metavar="FILE", help="also write every row to FILE")
    parser.add_argument("--plot", metavar="PNG", help="plot eval tokens/s against the cache size")
    parser.add_argument("--child", choices=["eval", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--offload", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        opts.task = opts.child
        return child(opts)
    if opts.quick:
        opts.sweep = []

    work = opts.workdir or tempfile.mkdtemp(prefix="bench_offload_")
    data = os.path.join(work, "data-bin")
    if not os.path.isdir(data):
        data = write_data(work, test=opts.test_sentences)
    checkpoints = {}
    for router in ("hash", "switch"):
        path = os.path.join(work, f"{router}.pt")
        if not os.path.exists(path):
            save_untrained_checkpoint(path, model_flags(data, opts, router))
        checkpoints[router] = path
    expert_mb = (2 * opts.embed_dim * opts.ffn_dim + opts.embed_dim + opts.ffn_dim) * 4 / 2**20
    print(f"{opts.hash_layers} hash layers x {opts.experts} experts of {expert_mb:.1f} MB "
          f"({opts.hash_layers * opts.experts * expert_mb:.0f} MB of experts); "
          f"cache {opts.cache} experts; {opts.threads} threads; {opts.repeat} run(s) a row",
          flush=True)
    started = time.perf_counter()
    rows = []
    print("| model | page cache | eval tokens/s | beam-5 sentences/s | peak RSS MB | "
          "cache peak MB | expert MB read (eval) | disk MB read (eval) | load avg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for cold in (False, True):
        for name, router, offload in ROWS:
            ev = measure(opts, checkpoints[router], data, "eval", offload, opts.cache, cold)
            gen = (None if opts.quick else
                   measure(opts, checkpoints[router], data, "generate", offload, opts.cache, cold))
            row = dict(model=name, cold=cold, cache=opts.cache, eval=ev, generate=gen)
            rows.append(row)
            both = [ev] + ([gen] if gen else [])
            load = [both[0]["load"][0], both[-1]["load"][1]]  # before the first, after the last
            print(f"| {name} | {'cold' if cold else 'warm'} | {ev['tokens_per_s']:.0f} | "
                  f"{format(gen['sentences_per_s'], '.2f') if gen else '-'} | "
                  f"{max(r['peak_rss_mb'] for r in both):.0f} | "
                  f"{max(r['cache_peak_mb'] for r in both):.0f} | "
                  f"{ev['expert_read_mb']:.0f} | {ev['disk_read_mb']:.0f} | "
                  f"{load[0]:.1f}-{load[1]:.1f} |", flush=True)
    sweep = []
    if opts.sweep:
        print("\n| cache (experts) | on demand tokens/s | exact prefetch tokens/s | cache peak MB | "
              "load avg |")
        print("|---:|---:|---:|---:|---:|", flush=True)
        for cache in opts.sweep:
            got = {mode: measure(opts, checkpoints["hash"], data, "eval", mode, cache, True)
                   for mode in ("demand", "prefetch")}
            sweep.append(dict(cache=cache, **got))
            print(f"| {cache} | {got['demand']['tokens_per_s']:.0f} | "
                  f"{got['prefetch']['tokens_per_s']:.0f} | "
                  f"{got['prefetch']['cache_peak_mb']:.0f} | "
                  f"{got['demand']['load'][0]:.1f}-{got['prefetch']['load'][1]:.1f} |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(threads=opts.threads, repeat=opts.repeat, rows=rows, sweep=sweep), f,
                      indent=1)
    if opts.plot and sweep:
        plot(sweep, rows, opts.plot)


def plot(sweep, rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(s["cache"]) for s in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for mode, label in (("prefetch", "hash, exact prefetch"), ("demand", "hash, on demand")):
        ax.plot(sizes, [s[mode]["tokens_per_s"] for s in sweep], marker="o", label=label)
    resident = [r["eval"]["tokens_per_s"] for r in rows if r["model"] == "all resident" and r["cold"]]
    if resident:
        ax.axhline(resident[0], color="gray", linestyle="--", label="all resident")
    ax.set_xlabel("--hash-expert-cache (experts)")
    ax.set_ylabel("fairseq-eval-lm tokens/s")
    ax.set_title("Expert file not in the page cache (cold)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
