"""On CUDA: the experts pinned in host memory, copied on the loader's side stream.

Written without a GPU at hand: untested on one. The loader records an event
after its copies; the forward's stream waits on it before computing.
"""
from typing import List, Sequence

import torch


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The loader's stream: its copies overlap the forward's compute."""
    return torch.cuda.Stream(device)


def pin(pieces: Sequence[Sequence[tuple]], dtype: torch.dtype) -> List[torch.Tensor]:
    """Per parameter, its ``(first row, tensor, ...)`` pieces as one ``[K, ...]``
    tensor of ``dtype`` in pinned host memory: converted here, once, so that each
    copy to the device carries the model's dtype (half the bytes of fp32 for bf16),
    and rounded as the device would round it (to nearest even)."""
    out = []
    for parts in pieces:
        rows = sum(t.size(0) for _, t, *_ in parts)
        pinned = torch.empty((rows, *parts[0][1].shape[1:]), dtype=dtype, pin_memory=True)
        for first, t, *_ in parts:
            pinned[first:first + t.size(0)].copy_(t)
        out.append(pinned)
    return out


def copy_rows(pinned: Sequence[torch.Tensor], expert: int, device: torch.device,
              stream) -> List[torch.Tensor]:
    """Expert ``expert``'s rows, one asynchronous copy a row on ``stream``."""
    with torch.cuda.stream(stream):
        return [rows[expert].to(device, non_blocking=True) for rows in pinned]


def copied(stream) -> torch.cuda.Event:
    """An event that fires once ``stream``'s copies so far are done."""
    event = torch.cuda.Event()
    event.record(stream)
    return event


def used_until(device: torch.device) -> torch.cuda.Event:
    """An event after the work queued so far on the forward's stream: once it fires,
    the device no longer reads an expert that work used."""
    return copied(torch.cuda.current_stream(device))


def wait_for(entries, device: torch.device):
    """Make the forward's stream wait for the loaded ``entries``' copies."""
    stream = torch.cuda.current_stream(device)
    for entry in entries:
        stream.wait_event(entry.event)
        for row in entry.rows:  # so that the loader's frees wait for this stream
            row.record_stream(stream)
