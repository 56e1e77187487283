"""Generation on a hash LM: beam search scores and left-padded batches."""
import math
import os
import subprocess

import pytest
import torch

from hashfns_util import (BIN, hashfns_corpus, hashfns_data_dir, hashfns_model,
                          hashfns_multihash_checkpoint, hashfns_user_dir)


def beam_hypotheses(ckpt, corpus, prompt, beam=5):
    """fairseq-interactive's n-best: (words, score, positional scores), scores in base 2."""
    proc = subprocess.run(
        [os.path.join(BIN, "fairseq-interactive"), corpus, "--task", "language_modeling",
         "--path", ckpt, "--user-dir", hashfns_user_dir(), "--cpu", "--beam", str(beam),
         "--nbest", str(beam), "--max-len-b", "8"],
        input=prompt + "\n", capture_output=True, text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    hyps = [line.split("\t") for line in lines if line.startswith("H-0\t")]
    positional = [line.split("\t")[1] for line in lines if line.startswith("P-0\t")]
    return [(words.split(), float(score), [float(p) for p in pos.split()])
            for (_, score, words), pos in zip(hyps, positional)]


def test_beam_search_scores_equal_a_full_forward_of_each_hypothesis(tmp_path_factory):
    from fairseq.models.transformer_lm import TransformerLanguageModel

    base = tmp_path_factory.getbasetemp()
    corpus = hashfns_corpus(str(base / "hashfns_corpus"))
    # bigram MultiHash on both layers: routing needs each beam's previous token
    ckpt = hashfns_multihash_checkpoint(base, corpus)
    hyps = beam_hypotheses(ckpt, corpus, "v3 v4")
    assert len(hyps) == 5 and len({tuple(words) for words, _, _ in hyps}) == 5
    hub = TransformerLanguageModel.from_pretrained(os.path.dirname(ckpt),
                                                   os.path.basename(ckpt), corpus).eval()
    model, d = hub.models[0], hub.task.target_dictionary
    for words, score, positional in hyps:
        assert words[:2] == ["v3", "v4"]
        target = torch.tensor([[d.index(w) for w in words] + [d.eos()]])  # [1, T]
        inputs = torch.cat([torch.tensor([[d.eos()]]), target[:, :-1]], 1)
        with torch.no_grad():
            lprobs = model.get_normalized_probs(model(inputs), log_probs=True)
        full = lprobs.gather(-1, target.unsqueeze(-1))[0, :, 0] / math.log(2)  # [T] base 2
        torch.testing.assert_close(torch.tensor(positional), full, rtol=0, atol=2e-4)
        assert score == pytest.approx(full.mean().item(), abs=2e-4)


def layer_outputs(model, tokens):
    """Each hash layer's expert indices ``[T*B, N]`` and output ``[T, B, d]``."""
    outputs = {}
    hooks = [moe.register_forward_hook(lambda m, args, y, i=i: outputs.__setitem__(i, y))
             for i, moe in model.decoder.moe_layers.items()]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return {i: (moe.last_indices, outputs[i]) for i, moe in model.decoder.moe_layers.items()}


@pytest.mark.parametrize("hash_type", ["bigram", "position", "previous"])
def test_a_left_padded_batch_routes_and_computes_as_each_sentence_alone(tmp_path, hash_type):
    model, d = hashfns_model(hashfns_data_dir(str(tmp_path)), "--hash-type", hash_type,
                             "--hash-layer", "0,1")
    gen = torch.Generator().manual_seed(0)
    sentences = [torch.randint(d.nspecial, len(d), (n,), generator=gen) for n in (7, 3, 5)]
    T, B = max(len(s) for s in sentences), len(sentences)
    batch = torch.full((B, T), d.pad())
    for b, s in enumerate(sentences):
        batch[b, T - len(s):] = s  # left padding, as generation batches prompts
    together = layer_outputs(model, batch)
    for b, s in enumerate(sentences):
        alone = layer_outputs(model, s.unsqueeze(0))
        real = slice(T - len(s), T)
        for i, (indices, y) in together.items():
            alone_indices, alone_y = alone[i]
            n = indices.size(-1)
            torch.testing.assert_close(indices.view(T, B, n)[real, b], alone_indices)
            torch.testing.assert_close(y[real, b], alone_y[:, 0], rtol=1e-5, atol=1e-5)
