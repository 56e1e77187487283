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
import torch
from fairseq.models.transformer import TransformerDecoder

from ..errors import HashConfigError
from ..expert_parallel import gather_counts
from ..hashing import RouteInputs
from ..routers import HashRouter
from .hash_layers import (build_hash_moe, build_hash_router, check_hash_args,  # noqa: F401
                          log_expected_load, parse_hash_layers, pass_route_through, replace_ffn)


class HashTransformerDecoder(TransformerDecoder):
    """TransformerDecoder whose layers ``--hash-layer`` route their FFN by hash."""

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False,
                 output_projection=None):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)
        self.add_hash_layers(args, dictionary)

    @classmethod
    def adopt(cls, decoder: TransformerDecoder, args, dictionary) -> "HashTransformerDecoder":
        """Turn a decoder fairseq has built into this class, in place.

        fairseq's ``TransformerLanguageModel.build_model`` constructs its
        ``TransformerDecoder`` by name; adopting it (rather than building a
        second one) keeps every shared weight exactly as transformer_lm
        initialises it under the same --seed.
        """
        decoder.__class__ = cls
        decoder.add_hash_layers(args, dictionary)
        return decoder

    def add_hash_layers(self, args, dictionary):
        check_hash_args(args)
        self.hash_layer_ids = parse_hash_layers(args.hash_layer, len(self.layers))
        self.moe_layers = {}
        for idx in self.hash_layer_ids:
            layer = self.layers[idx]
            moe = build_hash_moe(args, dictionary, idx, layer.embed_dim, layer.fc1.out_features)
            replace_ffn(layer, moe)
            pass_route_through(layer, moe)
            self.moe_layers[idx] = moe
        log_expected_load(self.moe_layers, dictionary)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        for idx, moe in self.moe_layers.items():
            router = f"{name}.layers.{idx}.fc1.router"
            if isinstance(moe.router, HashRouter) and f"{router}.table" in state_dict:
                saved = moe.router.saved_hash_type(state_dict, router)
                if saved != moe.router.hash_fn.name:
                    raise HashConfigError(
                        f"hash layer {idx} of the checkpoint was trained with --hash-type "
                        f"{saved} but --hash-type is {moe.router.hash_fn.name}; use the "
                        f"checkpoint's value"
                    )
            key = f"{name}.layers.{idx}.fc1.experts.fc1_weight"
            # all K FFNs of the layer, whichever share of them this rank holds
            num_ffns = moe.experts.total_experts
            if key in state_dict and state_dict[key].size(0) != num_ffns:
                raise HashConfigError(
                    f"the checkpoint has {state_dict[key].size(0)} experts in hash layer {idx} "
                    f"but --hash-experts is {num_ffns}; use the checkpoint's value"
                )
            table = state_dict.get(f"{name}.layers.{idx}.fc1.router.table")
            if table is not None and table.size(1) != moe.router.table.size(1):
                per_hash = moe.router.hash_fn.columns_per_hash
                raise HashConfigError(
                    f"the checkpoint has {table.size(1) // per_hash} hash(es) in hash layer "
                    f"{idx} but --hash-count is {moe.router.table.size(1) // per_hash}; use "
                    f"the checkpoint's value"
                )
            missing = f"{name}.layers.{idx}.fc1.router.table"
            if missing not in state_dict and f"{name}.layers.{idx}.fc1.weight" in state_dict:
                raise HashConfigError(
                    f"layer {idx} of the checkpoint is a dense FFN, not a hash layer; "
                    f"check --hash-layer (this model routes layers {self.hash_layer_ids})"
                )

    def route_inputs(self, prev_output_tokens, incremental_state=None) -> RouteInputs:
        route = RouteInputs.from_tokens(
            prev_output_tokens, self.dictionary.pad(), self.dictionary.eos()
        )
        return route.last() if incremental_state is not None else route

    def plan_exchanges(self, route: RouteInputs):
        """Every expert-parallel hash layer's counts of all ranks, in one collective.

        A hash layer's routing depends on token ids alone, so the exchange
        sizes of all of them are known before the first layer runs.
        """
        planned = {idx: moe for idx, moe in self.moe_layers.items()
                   if moe.exchange is not None and isinstance(moe.router, HashRouter)}
        if not planned:
            return {}
        counts = torch.stack([
            torch.bincount(moe.router(None, route).indices.reshape(-1),
                           minlength=moe.num_experts)
            for moe in planned.values()])  # [layers, E]
        layout = next(iter(planned.values())).exchange.layout
        everyone = gather_counts(counts, layout)  # [P, layers, E]
        return {idx: everyone[:, i] for i, idx in enumerate(planned)}

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None,
                         **kwargs):
        route = self.route_inputs(prev_output_tokens, incremental_state)
        plans = self.plan_exchanges(route)
        for idx, moe in self.moe_layers.items():
            moe.next_route = (route, plans.get(idx))
        try:
            return super().extract_features(
                prev_output_tokens, encoder_out, incremental_state, **kwargs
            )
        finally:
            for moe in self.moe_layers.values():
                moe.next_route = (None, None)
