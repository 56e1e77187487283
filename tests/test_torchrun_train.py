"""fairseq_hash.cli.torchrun_train: fairseq-train's flags plus torchrun's place for this process."""
import os
import sys

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, run, user_dir
from fairseq_hash.cli.torchrun_train import torchrun_flags
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
