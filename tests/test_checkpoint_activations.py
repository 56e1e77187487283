"""--checkpoint-activations: the backward recomputes hash layers with the routing of their forward."""
import functools
import os

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, json_logs, run, tool, user_dir


def build(data_bin, *extra):
    from fairseq import options, tasks

    import fairseq_hash  # noqa: F401

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                                                "--dropout", "0", "--hash-type", "bigram",
                                                "--seed", "1", *extra])
    torch.manual_seed(1)
    task = tasks.setup_task(args)
    return task.build_model(args), task


def gradients_of_two_forwards_then_one_backward(model, task):
    """Two batches forward, then one backward: a recomputation of the first batch
    runs after the second batch's forward."""
    gen = torch.Generator().manual_seed(0)
    vocab = len(task.target_dictionary)
    loss = 0
    for _ in range(2):
        tokens = torch.randint(4, vocab, (3, 12), generator=gen)
        logits, _ = model(tokens)
        loss = loss + torch.nn.functional.cross_entropy(logits.view(-1, vocab), tokens.view(-1))
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradients_are_those_of_the_model_without_checkpointing(data_bin):
    plain = gradients_of_two_forwards_then_one_backward(*build(data_bin))
    model, task = build(data_bin, "--checkpoint-activations")
    assert hasattr(model.decoder.layers[0], "precheckpoint_forward")  # fairseq wrapped it
    checkpointed = gradients_of_two_forwards_then_one_backward(model, task)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fairseq_train_trains_with_checkpoint_activations(data_bin, tmp_path):
    proc = run([tool("fairseq-train"), data_bin, "--user-dir", user_dir(), *TINY_MODEL,
                *TINY_TRAIN, "--max-update", "20", "--checkpoint-activations",
                "--save-dir", str(tmp_path)])
    loss = [r["loss"] for r in json_logs(proc.stdout + proc.stderr, "train_inner")]
    assert len(loss) >= 2 and all(l == l for l in loss) and loss[-1] < loss[0]
    assert os.path.exists(tmp_path / "checkpoint_last.pt")


def test_fairseqs_checkpoint_wrapper_has_the_layout_the_route_relies_on():
    """models/fairseq_surgery.py reads this layout; a fairseq that changes it fails here."""
    from fairseq.modules.checkpoint_activations import _checkpointed_forward, checkpoint_wrapper

    layer = checkpoint_wrapper(torch.nn.Linear(2, 2))
    assert isinstance(layer.forward, functools.partial)
    assert layer.forward.func is _checkpointed_forward
    assert layer.forward.args == (layer.precheckpoint_forward, False)


def test_the_recomputation_in_backward_replays_the_forwards_argument():
    from fairseq.modules.checkpoint_activations import checkpoint_wrapper

    from fairseq_hash.models.fairseq_surgery import around_own_forward

    layer = checkpoint_wrapper(torch.nn.Linear(2, 2))
    seen = []

    def wrap(own):
        def tagged(x, tag=None):
            seen.append(tag)
            return own(x)
        return tagged

    call = around_own_forward(layer, wrap)
    call(torch.randn(3, 2, requires_grad=True), tag="first").sum().backward()
    assert seen == ["first", "first"]  # the forward, then its recomputation


def test_a_checkpoint_wrapper_of_another_layout_is_refused():
    from fairseq_hash.models.fairseq_surgery import around_own_forward

    layer = torch.nn.Linear(2, 2)
    layer.precheckpoint_forward = layer.forward
    layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward)
    with pytest.raises(RuntimeError, match="checkpoint_wrapper is not partial"):
        around_own_forward(layer, lambda own: own)
