"""fairseq's TransformerEncoder with chosen FFN sublayers turned into hash layers.

    encoder = HashTransformerEncoder.adopt(encoder, spec, src_dict, "0,-1")

The encoder sees its whole input at once, so the routing context (token,
previous token, next token, position; see ``hashing.RouteInputs``) comes from
``src_tokens`` as they are, left or right padded: every hash type works here,
``future`` included (the next source token is no secret), also in generation.
In a masked LM a masked position routes by the mask symbol's id, like any token.
"""
from typing import Optional

import torch
from fairseq.models.transformer import TransformerEncoder

from ..hashing import RouteInputs
from ..spec import HashLayerSpec
from .hash_layers import HashLayers


class HashTransformerEncoder(HashLayers, TransformerEncoder):
    """TransformerEncoder whose layers ``--encoder-hash-layer`` route their FFN by hash."""

    side = "encoder"

    @classmethod
    def adopt(cls, encoder: TransformerEncoder, spec: HashLayerSpec, dictionary, layers: str,
              flag: str = "--encoder-hash-layer", allow_none=False) -> "HashTransformerEncoder":
        """Turn an encoder fairseq has built into this class, in place.

        fairseq's ``transformer`` and ``roberta`` build their encoders by name;
        adopting one keeps every shared weight exactly as the dense model
        initialises it under the same --seed.
        """
        encoder.__class__ = cls
        encoder.add_hash_layers(spec, dictionary, layers, flag, allow_none=allow_none)
        return encoder

    def route_inputs(self, src_tokens: torch.Tensor) -> RouteInputs:
        return RouteInputs.from_tokens(src_tokens, self.dictionary.pad(), self.dictionary.eos())

    def forward(self, src_tokens, src_lengths: Optional[torch.Tensor] = None,
                return_all_hiddens: bool = False,
                token_embeddings: Optional[torch.Tensor] = None):
        with self.routing(self.route_inputs(src_tokens)):
            return super().forward(src_tokens, src_lengths, return_all_hiddens, token_embeddings)
