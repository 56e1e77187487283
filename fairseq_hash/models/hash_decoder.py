"""fairseq's TransformerDecoder with chosen FFN sublayers turned into hash layers.

    decoder = HashTransformerDecoder.adopt(decoder, spec, dictionary, "0,-1")

fairseq's decoder layers never see token ids. This decoder computes the
routing context (token, previous token, position; see ``hashing.RouteInputs``)
from ``prev_output_tokens`` before fairseq's own ``extract_features`` runs, and
hands it to its MoE layers (``HashLayers.routing``). In incremental decoding fairseq still passes the
whole prefix, so the previous token and the position of the last step come
from the prefix itself and routing equals a full forward pass.
"""
from fairseq.models.transformer import TransformerDecoder

from ..hashing import RouteInputs
from ..spec import HashLayerSpec
from .hash_layers import HashLayers


class HashTransformerDecoder(HashLayers, TransformerDecoder):
    """TransformerDecoder whose layers ``--hash-layer`` route their FFN by hash.

    In ``hash_transformer`` the layers come from ``--decoder-hash-layer``
    (``layers`` and ``flag``), and the table is the target dictionary's.
    """

    @classmethod
    def adopt(cls, decoder: TransformerDecoder, spec: HashLayerSpec, dictionary, layers: str,
              flag="--hash-layer", seed_offset=0, allow_none=False) -> "HashTransformerDecoder":
        """Turn a decoder fairseq has built into this class, in place.

        fairseq's ``TransformerLanguageModel.build_model`` constructs its
        ``TransformerDecoder`` by name; adopting it (rather than building a
        second one) keeps every shared weight exactly as transformer_lm
        initialises it under the same --seed.
        """
        decoder.__class__ = cls
        decoder.add_hash_layers(spec, dictionary, layers, flag, seed_offset, allow_none)
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
