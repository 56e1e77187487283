"""The moe_ criteria add the learned routers' auxiliary loss to fairseq's own criteria."""
import os

import pytest
import torch

from models_util import TINY_ROBERTA, TINY_SEQ2SEQ, build_in_process, classification_data, seq2seq_data

# criterion -> (its data fixture, model flags, task flags)
CASES = {
    "moe_label_smoothed_cross_entropy": ("pairs", TINY_SEQ2SEQ, ["--label-smoothing", "0.1"]),
    "moe_masked_lm": ("data_bin", TINY_ROBERTA, ["--task", "masked_lm", "--tokens-per-sample", "64"]),
    "moe_sentence_prediction": ("labelled", TINY_ROBERTA, [
        "--task", "sentence_prediction", "--num-classes", "2", "--init-token", "0",
        "--separator-token", "2", "--pooler-dropout", "0"]),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return seq2seq_data(str(tmp_path_factory.mktemp("pairs")), lines=100)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, data_bin):
    return classification_data(str(tmp_path_factory.mktemp("labelled")),
                               os.path.join(data_bin, "dict.txt"), n=100)


def parse(argv):
    from fairseq import options

    return options.parse_args_and_arch(options.get_training_parser(), list(map(str, argv)))


@pytest.mark.integration  # fairseq-preprocess'd data, fetched by name below, and fairseq training
@pytest.mark.parametrize("criterion", list(CASES))
def test_training_loss_is_the_criterion_plus_the_weighted_aux_loss(request, criterion):
    fixture, model_flags, extra = CASES[criterion]
    data = request.getfixturevalue(fixture)
    common = [data, *model_flags, *extra, "--router", "switch", "--cpu", "--dropout", "0",
              "--attention-dropout", "0", "--activation-dropout", "0"]
    moe = common + ["--criterion", criterion, "--moe-aux-loss-weight", "0.5"]
    model, task = build_in_process(moe)
    moe_criterion = task.build_criterion(parse(moe))
    base_criterion = task.build_criterion(parse(common + ["--criterion", criterion[len("moe_"):]]))
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_tokens=512)
                       .next_epoch_itr(shuffle=False)))
    model.train()
    loss, size, log = moe_criterion(model, sample)
    aux = sum(m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None)
    assert torch.isfinite(aux) and aux > 0
    assert log["moe_aux_loss"] == pytest.approx(float(aux) * size)
    own, own_size, _ = base_criterion(model, sample)
    assert size == own_size
    torch.testing.assert_close(loss, own + 0.5 * aux * size, rtol=1e-5, atol=1e-4)
