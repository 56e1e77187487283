"""fairseq's TransformerDecoder with chosen FFN sublayers turned into hash layers.

    decoder = HashTransformerDecoder(args, dictionary, embed_tokens)
    # or, around a decoder fairseq has already built:
    decoder = HashTransformerDecoder.adopt(decoder, args, dictionary)

fairseq's decoder layers never see token ids. This decoder computes the
routing context (token, previous token, position; see ``hashing.RouteInputs``)
from ``prev_output_tokens`` before fairseq's own ``extract_features`` runs, and
hands it to its MoE layers. In incremental decoding fairseq still passes the
whole prefix, so the previous token and the position of the last step come
from the prefix itself and routing equals a full forward pass.
"""
from fairseq.models.transformer import TransformerDecoder

from ..hashing import RouteInputs
from .hash_layers import (HashLayers, build_hash_moe, build_hash_router,  # noqa: F401
                          check_hash_args, log_expected_load, parse_hash_layers,
                          pass_route_through, replace_ffn)


class HashTransformerDecoder(HashLayers, TransformerDecoder):
    """TransformerDecoder whose layers ``--hash-layer`` route their FFN by hash.

    In ``hash_transformer`` the layers come from ``--decoder-hash-layer``
    (``spec`` and ``flag``), and the table is the target dictionary's.
    """

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False,
                 output_projection=None, spec=None, flag="--hash-layer", seed_offset=0):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)
        spec = args.hash_layer if spec is None else spec
        self.add_hash_layers(args, dictionary, spec, flag, seed_offset)

    @classmethod
    def adopt(cls, decoder: TransformerDecoder, args, dictionary, spec=None,
              flag="--hash-layer", seed_offset=0, allow_none=False) -> "HashTransformerDecoder":
        """Turn a decoder fairseq has built into this class, in place.

        fairseq's ``TransformerLanguageModel.build_model`` constructs its
        ``TransformerDecoder`` by name; adopting it (rather than building a
        second one) keeps every shared weight exactly as transformer_lm
        initialises it under the same --seed.
        """
        decoder.__class__ = cls
        spec = args.hash_layer if spec is None else spec
        decoder.add_hash_layers(args, dictionary, spec, flag, seed_offset, allow_none)
        return decoder

    def route_inputs(self, prev_output_tokens, incremental_state=None) -> RouteInputs:
        route = RouteInputs.from_tokens(
            prev_output_tokens, self.dictionary.pad(), self.dictionary.eos()
        )
        return route.last() if incremental_state is not None else route

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         **kwargs):
        with self.routing(self.route_inputs(prev_output_tokens, incremental_state)):
            return super().extract_features(
                prev_output_tokens, encoder_out, incremental_state, **kwargs
            )
