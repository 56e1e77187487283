"""fairseq_hash.cli.torchrun_train: fairseq-train's flags plus torchrun's place for this process."""
import os
import sys

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, run, user_dir
from fairseq_hash.cli.torchrun_train import store_of_its_own, torchrun_flags
from fairseq_hash.errors import HashConfigError
from test_expert_parallel import EXACT, free_port, losses, train_on_one_rank

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500", "LOCAL_WORLD_SIZE": "2"}


def test_each_process_is_told_its_rank_world_and_device_from_torchrun():
    flags = torchrun_flags(["data-bin", "--cpu"], TORCHRUN, has_gpu=False)
    assert flags == ["data-bin", "--cpu", "--distributed-world-size", "4",
                     "--distributed-rank", "3", "--device-id", "1",
                     "--distributed-init-method", "env://", "--distributed-no-spawn",
                     "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]


@pytest.mark.parametrize("args, has_gpu, ddp", [
    (["data-bin"], True, None),  # fairseq's default: pytorch_ddp
    (["data-bin"], False, "legacy_ddp"),
    (["data-bin", "--cpu"], True, "legacy_ddp"),
    (["data-bin", "--cpu", "--ddp-backend", "no_c10d"], False, "no_c10d"),
    (["data-bin", "--ddp-backend=pytorch_ddp"], True, "pytorch_ddp"),
])
def test_legacy_ddp_is_chosen_on_cpu_unless_a_ddp_backend_is_given(args, has_gpu, ddp):
    flags = torchrun_flags(args, TORCHRUN, has_gpu=has_gpu)
    given = [flags[i + 1] for i, a in enumerate(flags) if a == "--ddp-backend"]
    given += [a.split("=", 1)[1] for a in flags if a.startswith("--ddp-backend=")]
    assert given == ([ddp] if ddp else [])


@pytest.mark.parametrize("ddp", ["pytorch_ddp", "c10d"])
def test_a_gpu_only_ddp_backend_on_cpu_is_refused(ddp):
    with pytest.raises(HashConfigError, match=f"--ddp-backend {ddp} needs GPUs .* on CPU use "
                                              f"legacy_ddp"):
        torchrun_flags(["data-bin", "--cpu", "--ddp-backend", ddp], TORCHRUN, has_gpu=True)


@pytest.mark.parametrize("args, has_gpu, backend", [
    (["data-bin"], True, None),  # fairseq's default: nccl
    (["data-bin"], False, "gloo"),
    (["data-bin", "--cpu"], True, "gloo"),
    (["data-bin", "--cpu", "--distributed-backend", "mpi"], False, "mpi"),
])
def test_gloo_is_chosen_on_cpu_unless_a_backend_is_given(args, has_gpu, backend):
    flags = torchrun_flags(args, TORCHRUN, has_gpu=has_gpu)
    given = [flags[i + 1] for i, a in enumerate(flags) if a == "--distributed-backend"]
    assert given == ([backend] if backend else [])


def test_outside_torchrun_it_says_how_to_start_it():
    with pytest.raises(HashConfigError, match="RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, "
                                              "MASTER_PORT not set\\); start it with torchrun"):
        torchrun_flags(["data-bin"], {}, has_gpu=False)


def test_a_flag_it_sets_itself_is_refused():
    with pytest.raises(HashConfigError, match="--distributed-world-size: set from torchrun"):
        torchrun_flags(["data-bin", "--distributed-world-size=8"], TORCHRUN, has_gpu=False)


def torchrun_cpu(data_bin, save_dir, *extra):
    """fairseq-train's flags as 2 CPU ranks of torchrun's, with no --ddp-backend."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "fairseq_hash.cli.torchrun_train",
                data_bin, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN, *EXACT,
                "--max-update", "4", "--save-dir", save_dir, *extra], check=False)


def test_on_cpu_without_a_ddp_backend_it_trains_the_one_process_model(data_bin, tmp_path):
    proc = torchrun_cpu(data_bin, str(tmp_path / "ranks"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    # said once (rank 0), not once a rank
    assert out.count("fairseq_hash.cli.torchrun_train: on CPU: --ddp-backend legacy_ddp") == 1
    one = train_on_one_rank(data_bin, str(tmp_path / "one"), "--max-update", "4")
    assert len(losses(proc)) == 4 and losses(proc) == losses(one)


def test_a_refusal_under_the_launcher_is_one_line_from_rank_0(data_bin, tmp_path):
    save = str(tmp_path / "ranks")
    proc = torchrun_cpu(data_bin, save, "--ddp-backend", "fully_sharded")
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if "fairseq-hash: error:" in l]
    assert lines == ["[rank0]: fairseq-hash: error: --ddp-backend fully_sharded cannot keep "
                     "hash-layer experts correct on several ranks; use --ddp-backend legacy_ddp "
                     "(CPU or GPU) or pytorch_ddp (GPU)"]
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr
    assert not os.path.exists(save) or not os.listdir(save)


def test_each_attempt_of_the_group_gets_a_store_of_its_own():
    first = store_of_its_own({"MASTER_PORT": "29500"})
    again = store_of_its_own({"MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2"})
    assert first == {"TORCHELASTIC_USE_AGENT_STORE": "False", "MASTER_PORT": "29501"}
    assert again["MASTER_PORT"] == "29503"


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_torchrun_restarts_the_group_after_a_worker_is_killed(data_bin, tmp_path):
    import signal
    import subprocess
    import time

    from conftest import json_logs
    from test_preemption import text

    def launch(save, restarts, log):
        return subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nnodes", "1",
             "--nproc-per-node", "2", "--max-restarts", str(restarts), "--master-addr",
             "127.0.0.1", "--master-port", str(free_port()), "-m", "fairseq_hash.cli.torchrun_train",
             data_bin, "--user-dir", user_dir(), *TINY_MODEL, *TINY_TRAIN, *EXACT,
             "--max-tokens", "128", "--save-interval-updates", "2", "--max-update", "14",
             "--save-dir", save],
            stdout=open(log, "w"), stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))

    log = str(tmp_path / "restarted.log")
    agent = launch(str(tmp_path / "restarted"), 1, log)
    deadline = time.time() + 300
    while not any(r["num_updates"] >= 5 for r in json_logs(text(log), "train_inner")):
        assert time.time() < deadline and agent.poll() is None, text(log)[-3000:]
        time.sleep(0.2)
    os.kill(children(agent.pid)[-1], signal.SIGKILL)  # a worker, with no chance to save
    assert agent.wait(timeout=600) == 0, text(log)[-4000:]
    rows = [(int(r["num_updates"]), r["loss"]) for r in json_logs(text(log), "train_inner")]
    restart = next(i for i in range(1, len(rows)) if rows[i][0] <= rows[i - 1][0])
    before, after = rows[:restart], rows[restart:]
    # the second attempt starts after the last save (every 2 updates), not from scratch
    assert after[0][0] == 2 * ((after[0][0] - 1) // 2) + 1 > 1 and after[-1][0] == 14

    whole_log = str(tmp_path / "whole.log")
    assert launch(str(tmp_path / "whole"), 0, whole_log).wait(timeout=600) == 0
    whole = [(int(r["num_updates"]), r["loss"]) for r in json_logs(text(whole_log), "train_inner")]
    assert after == whole[after[0][0] - 1:] and before == whole[:len(before)]
