"""fairseq_hash.cli.torchrun_train: fairseq-train's flags plus torchrun's place for this process."""
import pytest

from fairseq_hash.cli.torchrun_train import torchrun_flags
from fairseq_hash.errors import HashConfigError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29500", "LOCAL_WORLD_SIZE": "2"}


def test_each_process_is_told_its_rank_world_and_device_from_torchrun():
    flags = torchrun_flags(["data-bin", "--cpu"], TORCHRUN, has_gpu=False)
    assert flags == ["data-bin", "--cpu", "--distributed-world-size", "4",
                     "--distributed-rank", "3", "--device-id", "1",
                     "--distributed-init-method", "env://", "--distributed-no-spawn",
                     "--distributed-backend", "gloo"]


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
