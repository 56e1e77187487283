"""On CUDA: the experts pinned in host memory, copied on the loader's side stream.

Written without a GPU at hand: untested on one. The loader records an event
after its copies; the forward's stream waits on it before computing.
"""
from typing import List, Sequence

import torch


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The loader's stream: its copies overlap the forward's compute."""
    return torch.cuda.Stream(device)


def pin(pieces: Sequence[Sequence[tuple]]) -> List[torch.Tensor]:
    """Per parameter, its ``(first row, tensor, ...)`` pieces as one ``[K, ...]``
    tensor in pinned host memory."""
    return [torch.cat([p[1] for p in parts]).pin_memory() for parts in pieces]


def copy_rows(pinned: Sequence[torch.Tensor], expert: int, dtype: torch.dtype,
              device: torch.device, stream) -> List[torch.Tensor]:
    """Expert ``expert``'s rows, one asynchronous copy a row on ``stream``."""
    with torch.cuda.stream(stream):
        return [rows[expert].to(device, non_blocking=True).to(dtype) for rows in pinned]


def copied(stream) -> torch.cuda.Event:
    """An event that fires once ``stream``'s copies so far are done."""
    event = torch.cuda.Event()
    event.record(stream)
    return event


def wait_for(entries, device: torch.device):
    """Make the forward's stream wait for the loaded ``entries``' copies."""
    stream = torch.cuda.current_stream(device)
    for entry in entries:
        stream.wait_event(entry.event)
        for row in entry.rows:  # so that the loader's frees wait for this stream
            row.record_stream(stream)
