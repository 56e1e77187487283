"""Expert parallelism: a hash layer's K experts spread over the ranks of a group.

    layout = expert_layout(parallel_size=2)      # on each of W ranks, W divisible by 2
    exchange = AllToAllExchange(layout)
    y = exchange(x, indices, weights, experts)   # experts hold this rank's K/P experts

The W ranks of fairseq's data-parallel world are cut into W/P *expert groups*
of P consecutive ranks. Rank ``j`` of a group holds the experts
``[j*K/P, (j+1)*K/P)``; the W/P groups are data-parallel replicas of each
other, and the ranks holding the same shard (one in each group) form its
*replica group*. Global expert ``e`` lives on rank ``e // (K/P)`` of every
expert group, in slot ``e % (K/P)``. By default P stays within the ranks of
one node (:func:`ranks_per_node`, ``HashLayerSpec.parallel_size_for``); P is
how a run is laid out, not part of the model, so a checkpoint loads under any
layout (``distributed_checkpoints.install_checkpoint_loading``).

Tokens travel to their expert's rank and back through fairscale's MoE
all-to-all (``fairscale.nn.moe.moe_layer._AllToAll``), which splits its input
evenly: every rank sends ``P`` blocks of ``C`` rows, ``C`` the largest count
any rank sends any other in this step, learned from one all-gather of the
per-expert counts; or (``--moe-dispatch alltoall-exact``) through torch's
``all_to_all_single`` with exact split sizes, so no padding row travels.
Nothing is dropped and no one-hot ``[S, K, C]`` mask is built: rows are placed
by index. Hash layers know their counts from the token ids before the layer
runs, so the decoder gathers every hash layer's counts in one collective per
forward pass and reads them once (``moe_layer.plan_hash_dispatch``); the
exchange itself then reads nothing from the device.

Every rank must run these collectives in the same order: what would make
ranks take different paths (LayerDrop, ``--store-ema``, ``--eval-bleu``,
fairseq's recovery from out-of-memory errors) is refused or made to fail
(``HashLayerSpec.validate``, :func:`fail_on_out_of_memory`).

Gradients: an expert's gradient sums the contributions of every token routed
to it anywhere in the global batch. Within a group the all-to-all's backward
brings them to the expert's rank; across groups :class:`ExpertGradientSync`
all-reduces each expert shard over its replica group once per update, on the
last micro-batch of ``--update-freq``, without waiting, as autograd finishes
it, and divides by W, matching fairseq's averaging of shared gradients, which
it multiplies back by W before dividing by the sample size.
"""
from .exchange import AllToAllExchange, gather_counts
from .gradient_sync import ExpertGradientSync
from .guards import _raising_out_of_memory, fail_on_out_of_memory
from .layout import EXPERT_SAFE_BACKENDS, expert_layout, ranks_per_node, world_size

__all__ = ["AllToAllExchange", "gather_counts", "ExpertGradientSync", "fail_on_out_of_memory",
           "_raising_out_of_memory", "EXPERT_SAFE_BACKENDS", "expert_layout", "ranks_per_node",
           "world_size"]
